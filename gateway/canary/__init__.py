"""Canary rollouts: the declared spec, its state machine, the statistics, the controller and its report."""
