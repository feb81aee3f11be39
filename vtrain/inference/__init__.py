"""Using a trained task: prediction, pictures, export (above training, which it loads through)."""
