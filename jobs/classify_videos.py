"""`ray job submit` entrypoint: classify every frame of every video under INPUT.

    ray job submit --working-dir . -- python jobs/classify_videos.py INPUT OUTPUT [flags]

Takes the same arguments as `rayvid run` (see README). Inside a Ray job RAY_ADDRESS is
set, so it runs on that cluster; exits 0 when the job ran (failed videos are rows of
OUTPUT/errors/), 2 with a one-line reason when it could not run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayvid.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["run", *sys.argv[1:]])
