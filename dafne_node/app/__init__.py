"""How the node runs: its process roles (node, worker, trainer) and the ``dafne-node`` command."""
