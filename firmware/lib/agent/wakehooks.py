# What the wake calls about jobs outside the job runner (agent.jobs): the
# connectivity trial around each connection attempt, and a crash of the last
# wake. Kept apart from the runner so that neither is in the heap of the
# other's wake.

from agent.jobs import (FAILED, STATE_PATH, SUCCEEDED, Runner, load_state, on_trial, record_final,
                        save_state)
from agent.jobs import _UPDATE_TRIAL_PHASES as UPDATE_TRIAL_PHASES
from agent.jsonfile import read_json, write_json
from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL


def trial_active():
    """A trial that needs a connection at this boot: a connectivity config, a
    certificate renewal, or an OTA/app update that switched and must pass its
    self-test."""
    return on_trial(load_state()["cur"])


def cert_on_trial():
    """Whether this connection presents the renewal (/tls/id.try): a `cert` job
    in its trial phase. In any other phase (started, reverting) it is id.der."""
    cur = load_state()["cur"]
    return cur is not None and cur["type"] == "cert" and cur["phase"] == "trial"


def note_crash(reason):
    """The previous wake crashed: remember why with the job it was running (if
    any), so that the job ends FAILED with that reason instead of running again."""
    state, _ = read_json(STATE_PATH)
    if isinstance(state, dict) and isinstance(state.get("cur"), dict) and not state["cur"].get("crash"):
        state["cur"]["crash"] = reason
        save_state(state)


def on_connected(ctx):
    """The broker was reached: a connectivity trial succeeded (or a revert did)."""
    state = load_state()
    cur = state["cur"]
    if cur is None or cur["type"] not in ("config", "cert") or cur["phase"] not in ("trial", "revert"):
        return
    runner = Runner(ctx)
    if cur["type"] == "cert":
        _cert_connected(ctx, runner, cur)
        return
    if cur["phase"] == "revert":
        # A power cut came after the revert began: connected, so it is done.
        ctx.stage.flags &= ~FLAG_TRIAL
        runner.finish(cur, FAILED, "could not reach the broker with the new settings; reverted")
        runner.save()  # the published outbox, cleared: else the job runner sends it again
        return
    from agent import config
    from agent.handlers import apply_change

    current, _ = read_json(config.CONFIG_PATH)
    wanted = apply_change(current, cur["params"])
    if wanted != current:
        # A power cut came between the trial's start and the new file: this
        # connection used the old settings. Apply them now; the trial goes on.
        write_json(config.CONFIG_PATH, wanted)
        ctx.request_upload()
        return
    ctx.stage.flags &= ~FLAG_TRIAL
    runner.finish(cur, SUCCEEDED, "connected with the new settings")
    runner.save()  # the published outbox, cleared: else the job runner sends it again


def on_upload_failed(ctx, error):
    """The broker was not reached: count the trial down, revert at zero.

    The revert is a phase of its own, written before the last good config is
    put back: a power cut in between finds "revert" (finish it), never "trial"
    (which would apply the bad settings again)."""
    state = load_state()
    cur = state["cur"]
    if cur is not None and cur["type"] in ("ota", "app") and cur["phase"] in UPDATE_TRIAL_PHASES:
        if cur["type"] == "ota":
            from agent import ota as update
        else:
            from agent import appupdate as update
        update.on_upload_failed(ctx, state, cur, error)
        return
    if not on_trial(cur) or cur["type"] not in ("config", "cert"):
        ctx.stage.flags &= ~FLAG_TRIAL
        return
    if cur["type"] == "cert":
        _cert_failed(ctx, state, cur, error)
        return
    if _still_on_trial(state, cur, error):
        return
    from agent import config

    config.restore_good()
    record_final(state, cur, FAILED, "could not reach the broker with the new settings (%s); reverted"
                 % cur["data"].get("error", error))
    save_state(state)
    ctx.stage.flags &= ~FLAG_TRIAL
    ctx.stage.flags |= FLAG_JOBS
    ctx.request_upload()  # report the failure with the old settings next wake
    print("jobs: config trial failed, previous settings restored")


# A `cert` job's trial (agent.handlers.run_cert wrote /tls/id.try, then saved
# the phase "trial"). Power loss, step by step:
#   trial, id.try there        connected with it: rename over id.der, SUCCEEDED
#   trial, id.try gone         renamed already (cut before the status): SUCCEEDED
#   trial, id.bad there        a revert got that far: FAILED
#   revert (saved first)       id.try to id.bad, id.bad removed, then FAILED in the
#                              state; each step is idempotent, so a cut repeats it
#                              (a sweep found id.bad left behind when the state was
#                              written before the removal)
def _cert_connected(ctx, runner, cur):
    from agent import tlsid

    ctx.stage.flags &= ~FLAG_TRIAL
    if cur["phase"] == "trial" and tlsid.promote() == "promoted":
        runner.finish(cur, SUCCEEDED, "connected with the new certificate")
    else:
        tlsid.set_aside()
        tlsid.forget_bad()
        runner.finish(cur, FAILED, _cert_refused(cur, None))
    runner.save()  # the published outbox, cleared: else the job runner sends it again


def _cert_refused(cur, error):
    why = (cur["data"] or {}).get("error", error) or "its trial ended"
    return "broker refused the new certificate (%s); reverted" % why


def _still_on_trial(state, cur, error):
    """One more failed connection of a trial (connectivity config or renewal): count
    it down; at zero the revert phase is written first, before anything is put
    back, so a power cut finds "revert" (finish it), never "trial" again. True
    while wakes are left."""
    if cur["phase"] == "trial":
        cur["data"]["wakes_left"] -= 1
        if cur["data"]["wakes_left"] > 0:
            save_state(state)
            return True
        cur["phase"] = "revert"
        cur["data"]["error"] = error
        save_state(state)
    return False


def _cert_failed(ctx, state, cur, error):
    """The broker was not reached with the renewal: count down, revert at zero."""
    from agent import tlsid

    if _still_on_trial(state, cur, error):
        return
    # The renewal goes before the job ends: once it has ended nothing looks at
    # /tls again, and a cut in between repeats these idempotent steps.
    tlsid.set_aside()
    tlsid.forget_bad()
    record_final(state, cur, FAILED, _cert_refused(cur, error))
    save_state(state)
    ctx.stage.flags &= ~FLAG_TRIAL
    ctx.stage.flags |= FLAG_JOBS
    ctx.request_upload()  # report the failure with the old certificate next wake
    print("jobs: certificate trial failed, the previous one is used again")
