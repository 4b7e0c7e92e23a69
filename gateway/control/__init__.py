"""The control plane: the one path for changes (`operations`), the live view, policies, engine adapters."""
