"""Process start to exit of a command with a file on stdin: posix_spawn, then waitpid.

Usage: MEASURE_ENV="K=V K2=V2" python3 latency.py LABEL STDIN_FILE RUNS COMMAND [ARGS...]

The command's environment is exactly MEASURE_ENV; stdout and stderr go to /dev/null; every run
must exit 0. Prints p50/p90/p99/min/max in milliseconds after 20 warm-up runs. Used for the
hook-ingest figures in docs/ingest.md.
"""
import os, sys, time, statistics, json
def run(argv, stdin_path, env, n, warmup=20):
    times = []
    for i in range(warmup + n):
        fd = os.open(stdin_path, os.O_RDONLY)
        devnull = os.open("/dev/null", os.O_WRONLY)
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter_ns()
        os.close(fd); os.close(devnull)
        assert os.waitstatus_to_exitcode(status) == 0
        if i >= warmup:
            times.append((t1 - t0) / 1e6)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return {"n": n, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "min": times[0], "max": times[-1], "mean": statistics.mean(times)}
if __name__ == "__main__":
    label, stdin_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    argv = sys.argv[4:]
    env = dict(kv.split("=", 1) for kv in os.environ.get("MEASURE_ENV", "").split() if kv)
    r = run(argv, stdin_path, env, n)
    print(f"{label:40s} n={r['n']} p50={r['p50']:.2f}ms p90={r['p90']:.2f}ms p99={r['p99']:.2f}ms min={r['min']:.2f}ms max={r['max']:.2f}ms")
