"""``python -m vtrain.eval experiment=... ckpt_path=...``: evaluate a checkpoint (same as ``mode=eval``)."""
from vtrain.cli import evaluate

if __name__ == "__main__":
    evaluate()
