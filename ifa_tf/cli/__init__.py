"""Console scripts: thin absl `main`s over library functions that the tests call directly."""

import sys

from absl import app, flags


def run_app(main, module_name):
    """`app.run(main)` with the flags defined in `module_name` listed by `--help`.

    absl's `--help` lists the key flags of the main module, `sys.argv[0]`; for a console
    script that is the generated wrapper, which defines none.
    """
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
