"""``python -m detkd.cli`` (what Kubeflow components and Ray jobs run)."""

import sys

from detkd.cli import main

sys.exit(main())
