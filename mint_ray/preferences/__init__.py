"""Stage 3: teacher-ranked preference pairs (``mint-ray preferences``).

``pairs`` (pure pairing rules) and ``validate`` (pure row checks) import no Ray;
``pipeline`` is the Ray Data stage.
"""
