"""Sub-commands of the `vhsm` command line, one module each (see `vhsm.cli`)."""
