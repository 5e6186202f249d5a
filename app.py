"""The threedistill web app: ``python app.py [--host 127.0.0.1] [--port 7860] [--outputs outputs]``.

The page lives in :mod:`threedistill.app.ui`; the job queue in :mod:`threedistill.app.jobs`.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from threedistill.app.ui import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
