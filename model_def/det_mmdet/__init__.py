"""MMDetection 3.x training on Determined AI: ``MMDetTrial`` plus the ``det-mmdet`` command."""

import warnings

# mmengine imports pkg_resources (pinned setuptools<81 keeps it); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

__version__ = "0.1.0"
