"""vhsm: vhost-user back-ends in Python, the protocol declared as state machines."""

__version__ = "0.1.0"
