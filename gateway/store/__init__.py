"""Operator state and the request log: one module per table, behind the interfaces in `store.api`."""
