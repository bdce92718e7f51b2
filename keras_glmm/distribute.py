"""Multi-worker (multi-machine) training of GLMMs with `MultiWorkerMirroredStrategy`.

Keras 3 supports one distribution strategy across machines on the TensorFlow
backend: synchronous data parallelism with `tf.distribute.MultiWorkerMirroredStrategy`
(it has no `ParameterServerStrategy`, keras-team/keras#18624). Every worker holds
a copy of the weights, computes the gradient of its share of each batch, and the
workers add their gradients with collective all-reduces before each update.

`multi_worker_strategy` builds the strategy from `TF_CONFIG`, which the launcher's
environment gives (each worker's `TF_CONFIG` differs only in its task index);
`tf_config_from_slurm` writes it from Slurm's variables. Files fitted under the
strategy are read in shares, worker `i` of `n` the files `i, i + n, ...`
(`keras_glmm.streaming.pipeline.worker_files`).
"""

import json
import os
import re
import socket
import time

import tensorflow as tf

from keras_glmm import compat

__all__ = ["multi_worker_strategy", "tf_config_from_slurm"]

DEFAULT_PORT = 12345


def _cluster_from_tf_config():
    """Parses and checks `TF_CONFIG`; returns `(config, workers, task_index)`."""
    raw = os.environ.get("TF_CONFIG")
    if raw is None or not raw.strip():
        raise ValueError(
            "keras_glmm.distribute.multi_worker_strategy: the TF_CONFIG environment "
            "variable is not set. Set it on every machine to JSON such as "
            '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (only "index" differs between machines).'
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON ({err}): {raw!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {type(config).__name__}: {raw!r}")  # noqa: TRY004
    cluster = config.get("cluster")
    if not isinstance(cluster, dict):
        raise ValueError(f'TF_CONFIG has no "cluster" object: {raw!r}')  # noqa: TRY004
    workers = cluster.get("worker")
    if (
        not isinstance(workers, list) or not workers
        or not all(isinstance(w, str) and w for w in workers)
    ):
        raise ValueError(
            f'TF_CONFIG\'s "cluster" needs a non-empty "worker" list of "host:port" strings: {raw!r}'
        )
    for address in workers:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"TF_CONFIG's worker address {address!r} is not of the form host:port")
    other_jobs = sorted(set(cluster) - {"worker", "chief"})
    if other_jobs:
        raise ValueError(
            f"TF_CONFIG's cluster has jobs {other_jobs}: MultiWorkerMirroredStrategy takes only "
            "'worker' (and optionally 'chief'); Keras 3 has no ParameterServerStrategy "
            "(keras-team/keras#18624)."
        )
    task = config.get("task")
    if not isinstance(task, dict):
        raise ValueError(f'TF_CONFIG has no "task" object: {raw!r}')  # noqa: TRY004
    task_type = task.get("type")
    index = task.get("index")
    if task_type not in ("worker", "chief"):
        raise ValueError(f'TF_CONFIG\'s task "type" must be "worker" (or "chief"), got {task_type!r}')
    job = cluster.get(task_type)
    if not isinstance(job, list) or not job:
        raise ValueError(f'TF_CONFIG\'s task type {task_type!r} has no list in "cluster"')
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(job):
        raise ValueError(
            f'TF_CONFIG\'s task "index" must be an integer in [0, {len(job)}), got {index!r}'
        )
    addresses = [a for name in ("chief", "worker") for a in cluster.get(name, []) or []]
    own = job[index]
    return raw, addresses, own


def expand_hostlist(hostlist):
    """Slurm's compressed host list -> host names: ``"node[01-03,07],gpu1"`` ->
    ``["node01", "node02", "node03", "node07", "gpu1"]`` (what `scontrol show
    hostnames` prints; ranges keep their zero padding; several bracket groups in
    one name multiply out)."""
    names = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            options = [text]
            if ranges:
                options = []
                for part in ranges.split(","):
                    first, _, last = part.partition("-")
                    if not first.isdigit() or (last and not last.isdigit()):
                        raise ValueError(f"Slurm host list {hostlist!r}: cannot read the range {part!r}")
                    width = len(first)
                    options += [text + str(n).zfill(width) for n in range(int(first), int(last or first) + 1)]
            expanded = [head + option for head in expanded for option in options]
        names += expanded
    return names


def _tasks_per_node(text, num_nodes):
    """Slurm's ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) -> tasks on each node."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}: cannot read {part!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if len(counts) != num_nodes:
        raise ValueError(f"SLURM_TASKS_PER_NODE={text!r} names {len(counts)} nodes, the node list {num_nodes}")
    return counts


def tf_config_from_slurm(port=DEFAULT_PORT, environ=None):
    """`TF_CONFIG` for this Slurm task: every task of the job step is a worker.

    Reads ``SLURM_JOB_NODELIST`` (or ``SLURM_STEP_NODELIST``; the compressed
    host list), ``SLURM_TASKS_PER_NODE`` (or ``SLURM_STEP_TASKS_PER_NODE``) and
    ``SLURM_PROCID``. Tasks get ports ``port, port + 1, ...`` on their node, in
    the order of Slurm's default (block) distribution of task ids over the
    nodes; worker `i` is task `SLURM_PROCID = i`. Set it before creating the
    strategy::

        os.environ["TF_CONFIG"] = kg.distribute.tf_config_from_slurm()
        strategy = kg.distribute.multi_worker_strategy()

    Args:
        port: the first port of each node (free on every node).
        environ: the environment to read (`os.environ` by default).

    Returns:
        The JSON string of `TF_CONFIG`.

    Raises:
        ValueError: not inside a Slurm job step (the variable missing is named),
            or the variables disagree.
    """
    environ = os.environ if environ is None else environ

    def variable(*names):
        for name in names:
            if environ.get(name):
                return environ[name]
        raise ValueError(
            f"tf_config_from_slurm: {names[0]} is not set: run it inside a Slurm job step "
            "(srun), one task per worker.")

    hosts = expand_hostlist(variable("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"))
    tasks = _tasks_per_node(variable("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"), len(hosts))
    workers = [f"{host}:{port + local}" for host, count in zip(hosts, tasks, strict=True) for local in range(count)]
    task_id = int(variable("SLURM_PROCID"))
    if not 0 <= task_id < len(workers):
        raise ValueError(f"SLURM_PROCID={task_id} is not among the step's {len(workers)} tasks")
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": task_id}})


def _split(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _reachable(address, timeout=1.0):
    try:
        with socket.create_connection(_split(address), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for_peers(raw, addresses, own, timeout):
    """Waits until every other address accepts TCP connections; raises TimeoutError.

    Meanwhile this worker's own port listens (a plain socket, closed before
    TensorFlow starts its server there), so that workers checking each other at
    the same time do not wait for each other forever.
    """
    _, port = _split(own)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as err:
        listener.close()
        raise OSError(
            f"keras_glmm.distribute: this worker's port {port} (its address {own!r} in TF_CONFIG) "
            f"is already in use ({err}); free it or change TF_CONFIG: {raw}"
        ) from err
    listener.listen(64)
    try:
        pending = [a for a in addresses if a != own]
        deadline = time.monotonic() + timeout
        while True:
            pending = [a for a in pending if not _reachable(a)]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if pending:
            raise TimeoutError(
                f"keras_glmm.distribute: worker(s) {', '.join(pending)} did not accept "
                f"connections within {timeout:g} seconds: start the same script on every "
                f"machine named in TF_CONFIG, and check the addresses and firewalls. "
                f"TF_CONFIG={raw}"
            )
    finally:
        listener.close()


def multi_worker_strategy(timeout=60.0):
    """Creates a `tf.distribute.MultiWorkerMirroredStrategy` from `TF_CONFIG`, or fails fast.

    `tf.distribute.MultiWorkerMirroredStrategy()` waits forever for workers that
    never come up. This function first checks, for at most `timeout` seconds,
    that every other worker named in `TF_CONFIG` accepts TCP connections, and
    raises a `TimeoutError` naming the unreachable ones instead of hanging; the
    strategy's start-up barrier gets the same timeout. The collectives of training
    steps get none (a timeout costs a thread per collective while it runs).

    Recipe for several machines: run the same script on every machine, with
    `TF_CONFIG` differing only in the task index::

        # machine 0: TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
        #                        "task": {"type": "worker", "index": 0}}'
        # machine 1: the same, with "index": 1
        import keras_glmm as kg

        strategy = kg.distribute.multi_worker_strategy()
        with strategy.scope():
            model = kg.GLMM(random_effects=[kg.RandomEffects(85, name="county")])
            model.fit(x, y)  # the same in-memory data on every worker

    Each worker fits on its share of every (full) batch and the gradients are
    summed across workers, so the fit matches a single-device fit. Worker 0 is
    the chief: save the model, write checkpoints and logs only there (the other
    workers should write to temporary locations). Keras 3 has no
    `ParameterServerStrategy` (keras-team/keras#18624); this synchronous
    strategy is the one multi-machine option.

    Args:
        timeout: Seconds to wait for the other workers to accept connections
            (and for the strategy's start-up barrier).

    Returns:
        A `tf.distribute.MultiWorkerMirroredStrategy`.

    Raises:
        ValueError: `TF_CONFIG` is missing or malformed (the message says what is wrong).
        TimeoutError: A worker did not accept connections within `timeout`
            seconds (the message names it and shows `TF_CONFIG`).
    """
    raw, addresses, own = _cluster_from_tf_config()
    if len(addresses) > 1:
        _wait_for_peers(raw, addresses, own, timeout)
    # No collective timeout (`CommunicationOptions(timeout_seconds=...)`): TensorFlow
    # holds a thread per collective until its timeout passes, thousands a minute at
    # millisecond steps, until the process cannot start one ("Resource temporarily
    # unavailable", an abort).
    try:
        # The strategy's start-up barrier (an all-reduce) waits forever by default.
        with compat.cluster_join_timeout(timeout):
            return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as err:
        if "Timeout waiting for the cluster" in str(err):
            raise TimeoutError(
                f"keras_glmm.distribute: the workers did not all join within {timeout:g} "
                f"seconds ({err}). TF_CONFIG={raw}"
            ) from err
        raise


def replica_share(loss, rows):
    """A replica's share of a step's loss, the mean over its `rows` rows (a scalar tensor).

    Keras sums the replicas' gradients and expects each replica's share of the loss
    (`Trainer.compute_loss`'s convention, which the model's `compute_loss` replaces).
    Weighted by its share of the step's rows, as batches may differ (workers' shares
    of files), the replicas' gradients add up to those of the mean over all the rows.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    context = tf.distribute.get_replica_context()
    if replicas > 1 and context is not None:
        return loss * rows / context.all_reduce("SUM", tf.stop_gradient(rows))
    if replicas > 1:
        return loss / tf.cast(replicas, loss.dtype)
    return loss
