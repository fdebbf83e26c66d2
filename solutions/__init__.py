"""Reference solutions of the notebooks' exercises (see README.md): one module per notebook."""
