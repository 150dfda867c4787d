"""MMDetection 3.x training on Determined AI: ``MMDetTrial`` plus the ``det-mmdet`` command."""

__version__ = "0.1.0"
