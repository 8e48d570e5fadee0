"""See moekern/analysis/__init__.py for what this subpackage answers."""
