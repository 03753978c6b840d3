"""``python -m rmt_deploy.run`` is ``rmt-run``."""

from rmt_deploy.cli import run_main

if __name__ == "__main__":
    run_main()
