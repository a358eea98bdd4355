"""``python -m dafne_node``: the ``dafne-node`` command.

``serve`` starts its trainer process this way, with the very interpreter it runs in.
"""

import sys

from dafne_node.app.cli import main

sys.exit(main())
