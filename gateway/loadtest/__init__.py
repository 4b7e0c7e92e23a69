"""Load tests: replay a golden set through each variant and compare them (`gateway loadtest`)."""
