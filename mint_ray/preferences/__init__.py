"""Stage 3: teacher-ranked preference pairs (``mint-ray preferences``).

- ``config``     the stage's ``Config`` and its sections
- ``plan``       driver-side decisions: the teacher's description, pair rule, validation rules
- ``schemas``    Arrow schemas and the pure table builders
- ``operators``  the Ray Data operators (read, prepare, score, pairs)
- ``fetch``      the cohort's images: resolved, confined to the cohort, read under a deadline
- ``sink``       the datasink writing pairs and quarantine
- ``accounting`` the run's counts and the checks before publishing
- ``run``        ``run(cfg)``: wires the dataset, publishes, tracks

``pairs`` (pure pairing rules), ``validate`` (pure row checks), ``schemas``,
``accounting``, ``plan`` and ``fetch`` import no Ray.
"""
