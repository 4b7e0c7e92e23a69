"""The operators' HTTP API under `/admin/`: routes that parse, call `control.operations`, and render."""
