"""The ``lattica`` command line: a thin client of the daemon's control socket."""
