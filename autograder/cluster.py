"""Grading on a Dask cluster: each submission is one task (``autograder.grade.run_task``), graded
on whichever worker is free, and its result (scores, graded notebook, feedback, log) comes back
to the process that started the run, which alone writes the gradebook.

    python -m autograder.grade SUBMISSIONS --scheduler local --workers 4   # a cluster on this machine
    python -m autograder.grade SUBMISSIONS --scheduler tcp://head:8786     # a running cluster

A worker machine needs the same checkout of the course and its environment (``make setup``), and
bubblewrap. Each task forks the process that grades it, so start the workers non-daemonic and
with one thread each, as ``local`` does:

    DASK_DISTRIBUTED__WORKER__DAEMON=False .venv/bin/dask worker tcp://head:8786 --nthreads 1

A worker's GPUs are its own: start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set, and the
device each submission was graded on is in the CSV.
"""

from __future__ import annotations

from dataclasses import replace

from .grade import Task, run_task


def _run_with_template(task: Task, template_db: bytes) -> dict:
    import multiprocessing

    if multiprocessing.current_process().daemon:
        raise RuntimeError("this Dask worker is daemonic and cannot fork the grading process: start it "
                           "with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    return run_task(replace(task, template_db=template_db))


def dask_results(tasks: list[Task], scheduler: str, workers: int = 1):
    """Grade ``tasks`` on the cluster at ``scheduler`` ("local": start one with ``workers``
    processes here, and stop it at the end); yield ``(task, result)`` as each finishes. A task
    whose worker failed comes back as a failed report with Dask's error, never as a score."""
    import dask
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == "local":
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None)
    client = Client(cluster if cluster is not None else scheduler)
    try:
        if not tasks:
            return
        # The released gradebook goes to the workers once, not with every task.
        template = client.scatter(tasks[0].template_db, broadcast=True)
        futures = {client.submit(_run_with_template, replace(t, template_db=b""), template, pure=False,
                                 key=f"grade-{t.student}-{t.assignment}-{i}"): t
                   for i, t in enumerate(tasks)}
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except Exception as err:
                result = {"report": {"success": False, "error": f"Dask worker failed: {type(err).__name__}: {err}"},
                          "seconds": 0.0, "worker": str(future.key)}
            yield task, result
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
