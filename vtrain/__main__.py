"""``python -m vtrain experiment=... [key=value ...]``: see :func:`vtrain.cli.run` for the whole flow."""
from vtrain.cli import main

if __name__ == "__main__":
    main()
