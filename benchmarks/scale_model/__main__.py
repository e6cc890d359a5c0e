"""``python -m benchmarks.scale_model``: see the package docstring."""

from benchmarks.scale_model.report import main

if __name__ == "__main__":
    main()
