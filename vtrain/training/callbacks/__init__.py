"""The callbacks every task shares, one concern per file (``conf/callbacks/default.yaml`` names them)."""
