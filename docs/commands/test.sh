# The README's second set-up command: install, then pass the tests.
pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest
