# The README's first set-up command: install, then run the server on the embedded demo model.
pip install torch==2.13.0 && pip install -e . && irg serve
