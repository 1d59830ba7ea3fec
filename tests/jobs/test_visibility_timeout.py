"""The one-week visibility timeout is in effect: in the configuration of a started worker (broker and
result backend), and in what its Redis transport does with messages left unacknowledged."""
import json
import time

from kombu import Consumer, Queue

from services.jobs.app import make_app
from services.jobs.settings import WEEK, JobsSettings
from services.pb import jobs_pb2
from tests.jobs.conftest import wait_for, watch_until_done

S = jobs_pb2.JobState
DAY = 24 * 3600


def test_the_shipped_settings_give_a_week(redis_server):
    # no other INTERNLM_* variable: what the launcher and compose run
    app = make_app(JobsSettings.from_env({"INTERNLM_REDIS_URL": redis_server.url}))
    assert app.conf.broker_transport_options["visibility_timeout"] == WEEK == 7 * DAY
    assert app.conf.result_backend_transport_options["visibility_timeout"] == WEEK
    with app.connection_for_write() as conn:  # the transport's channel, as a producer or consumer gets it
        assert conn.default_channel.visibility_timeout == WEEK


def test_a_started_worker_restores_only_messages_older_than_a_week(jobs_api, jobs_settings, workers, hf_source):
    """Two jobs whose messages a consumer took and died holding, unacknowledged for 8 and for 6 days
    (their age in kombu's own index is set back): a worker, whose transport looks for such messages
    when it starts, puts back only the one past a week, and runs it; the other stays where it is."""
    stub, _ = jobs_api
    app = make_app(jobs_settings)
    ids = [stub.SubmitJob(jobs_pb2.SubmitJobRequest(convert=jobs_pb2.ConvertJob(source=hf_source, output=out))).id
           for out in ("old", "recent")]
    taken = {}
    with app.connection_for_read() as conn:
        channel = conn.channel()
        consumer = Consumer(channel, [Queue("convert", routing_key="convert")], accept=["json"],
                            callbacks=[lambda body, m: taken.update({m.headers["id"]: m.delivery_tag})])
        consumer.consume()
        while len(taken) < 2:
            conn.drain_events(timeout=10)
        channel.qos.restore_at_shutdown = False  # it dies holding them: nothing is given back now
        client = channel.client
        assert client.llen("convert") == 0 and client.hlen(channel.unacked_key) == 2
        now = time.time()
        for job_id, age in zip(ids, (8 * DAY, 6 * DAY)):
            assert client.zadd(channel.unacked_index_key, {taken[job_id]: now - age}, xx=True, ch=True) == 1
        index_key, unacked_key = channel.unacked_index_key, channel.unacked_key

    w = workers("convert")
    # the running worker's own configuration (remote control answers with its app.conf)
    conf = app.control.inspect(destination=[w.name], timeout=10).conf()[w.name]
    assert conf["broker_transport_options"]["visibility_timeout"] == WEEK
    assert conf["result_backend_transport_options"]["visibility_timeout"] == WEEK

    old, recent = ids
    assert watch_until_done(stub, old)[-1].state == S.JOB_STATE_SUCCEEDED
    import redis

    client = redis.Redis.from_url(jobs_settings.redis_url)
    time.sleep(2)  # a restore of the recent one would come with the old one's, at the start; allow it time
    got = stub.GetJob(jobs_pb2.GetJobRequest(id=recent))
    assert got.state == S.JOB_STATE_QUEUED and got.executions == 0
    assert client.hexists(unacked_key, taken[recent]) and not client.hexists(unacked_key, taken[old])
    assert json.loads(client.hget(unacked_key, taken[recent]))[2] == "convert"
    assert client.zscore(index_key, taken[recent]) < time.time() - 6 * DAY + 60
    wait_for(lambda: client.llen("convert") == 0, timeout=5, what="nothing else queued")
