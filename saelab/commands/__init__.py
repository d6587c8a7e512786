"""What each `saelab` verb runs: its settings as one config dataclass (the flags come from its fields, see
saelab.cli.VERBS) and one function taking that config."""
