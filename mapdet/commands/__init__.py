"""The CLI commands, one wiring module each: read arguments, call the library, exit with a code."""
