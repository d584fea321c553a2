"""Many hosts on Ray: a backend daemon on every Ray node (node_agent.py), and the front (ray_placement.py) that
serves the same gRPC API by placing each sandbox on a node through Ray and proxying to that node's daemon."""
