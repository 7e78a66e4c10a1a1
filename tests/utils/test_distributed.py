"""broadcast_object(patient=True): the ranks that wait for rank 0's data checks do not time out
after --dist_timeout, as they would in the default group (2 gloo processes, a 2-second timeout,
rank 0 busy for 5 seconds)."""

import textwrap

from conftest import run_ranks

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from segment_anything.utils.distributed import broadcast_object, destroy_distributed, init_distributed

    rank, port, patient = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    init_distributed("cpu", rank, rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=2)
    if rank == 0:
        time.sleep(5)  # the checks
    try:
        got = broadcast_object({"checked": 100000} if rank == 0 else None, patient=patient)
    except RuntimeError as err:  # gloo's timeout
        got = f"timed out: {type(err).__name__}"
    print("RESULT " + json.dumps(got), flush=True)
    if patient:
        destroy_distributed()
    else:  # a group whose collective timed out can abort in its destructor at exit: not what is tested
        os._exit(0)
    """
)


def test_the_waiting_rank_outlasts_the_collective_timeout_when_patient(tmp_path):
    assert run_ranks(SCRIPT, tmp_path, 1) == [{"checked": 100000}] * 2


def test_without_patience_the_waiting_rank_times_out(tmp_path):
    assert run_ranks(SCRIPT, tmp_path, 0)[1].startswith("timed out")
