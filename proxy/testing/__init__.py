"""Replay in tests: a pytest plugin that records chat completions once and replays them offline.

``plugin`` holds the pytest side (options, marker, fixture), ``server`` the proxy run in a
thread for one test, ``files`` the recording files next to the tests, and ``mismatch`` the
explanation of a request that has no recording.
"""
