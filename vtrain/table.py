"""``python -m vtrain.table`` is ``python -m vtrain.tools.table`` (the tables moved to ``vtrain/tools/``)."""
from vtrain.tools.table.cli import main

if __name__ == "__main__":
    main()
