"""The `gateway` command line: one module per command group, one admin client, one error type."""
