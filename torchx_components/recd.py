"""TorchX component: launch your unchanged TorchRec training script with recd-plugin on.

``recd.train`` is TorchX's ``dist.ddp`` plus one argument, ``--recd``: the plugin flag, passed
to every rank through the ``RECD_PLUGIN`` environment variable. A script that calls
``recd_plugin.RecDConfig.load(args.recd)`` with no ``--recd`` of its own picks it up; the
script's command line stays as it was. Installing recd-plugin registers it (entry point
``torchx.components``, beside TorchX's own builtins)::

    torchx builtins                                   # lists recd.train, dist.ddp, utils.*, ...
    cd examples/movielens                             # its .torchxconfig selects local_cwd
    torchx run recd.train --script train.py --recd @recd.toml -j 1x1 -- --epochs 1

    # any scheduler, dry run: print the AppDef (image, resources, env) without launching
    torchx run --dryrun -s local_cwd recd.train --script train.py --recd @recd.toml

Several processes (``-j 1x2``: one node, two ranks) run the example sharded by
DistributedModelParallel with the plugin on; ``$RECD_DIST_BACKEND`` tells the script its
process-group backend (``nccl`` when ``--gpu`` > 0, else ``gloo``)::

    torchx run -s local_cwd recd.train --script train.py --recd @recd.toml -j 1x2 -- --sharding row_wise

    # GPU cluster, dry run (no cluster needed): the AppDef and the sbatch script
    torchx run --workspace "" --dryrun -s slurm recd.train --script train.py --recd @recd.toml \
        -j 2x8 --gpu 8 --image registry.example.com/recd:latest
"""


from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components import dist

ENV_VAR = "RECD_PLUGIN"  # the same name as recd_plugin.ENV_VAR, without importing torch here
BACKEND_VAR = "RECD_DIST_BACKEND"


def train(
    *script_args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    recd: str = "",
    image: str = torchx.IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    j: str = "1x1",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """Run ``script`` (or module ``m``) with torchrun on ``j`` = nodes x procs, plugin on.

    Args:
        script_args: arguments for the script, passed through unchanged
        script: the training script to run
        m: a Python module to run instead of a script
        recd: the recd-plugin flag (``key=value; ...``, ``@file.toml`` or ``off``); empty
            leaves ``$RECD_PLUGIN`` unset, so the plugin stays off unless the script enables it
        image: container image (ignored by local_cwd)
        name: job name override, as in dist.ddp
        h: a named resource (overrides cpu/gpu/memMB)
        cpu: CPUs per replica
        gpu: GPUs per replica (> 0 selects the nccl backend in your script as usual)
        memMB: memory per replica in MB
        j: nodes x processes per node, e.g. 1x2
        env: extra environment variables
        max_retries: restarts of the whole job on failure
        rdzv_port: rendezvous port
        mounts: volume mounts, as in dist.ddp
        debug: torchrun debug logging
    """
    env = dict(env or {})
    if recd:
        env[ENV_VAR] = recd
    # The process-group backend for the script (the example reads it): nccl with GPUs.
    env.setdefault(BACKEND_VAR, "nccl" if gpu > 0 else "gloo")
    return dist.ddp(
        *script_args, script=script, m=m, image=image, name=name, h=h, cpu=cpu, gpu=gpu,
        memMB=memMB, j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port,
        mounts=mounts, debug=debug,
    )
