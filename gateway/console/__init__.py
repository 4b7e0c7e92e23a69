"""The operator console: web pages served by the gateway at `/console` to watch routes, variants, canaries and
shadow copies, and to flip kill switches and act on canaries, through `control.operations` like the admin API."""
