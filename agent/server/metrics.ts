/**
 * A server's Prometheus metrics (`npm:prom-client`): the seed's Raft gauges
 * (read from the etcd member the server talks to), step counts and
 * durations by backend and outcome, queue depth, workers online, and the
 * plugin host counters of agents.
 *
 * @module
 */

import client from "npm:prom-client@15.1.3";
import type { SchedulerEvent } from "./scheduler.ts";

/** Where a server's etcd member stands, as `/raft-state` shows it. */
export interface RaftState {
  node_id: string;
  state: "leader" | "follower" | "candidate" | "standalone";
  leader: string;
  term: number;
  commit_index: number;
}

/** The metrics of one server. */
export class ServerMetrics {
  /** The registry `/metrics` renders. */
  readonly registry: client.Registry = new client.Registry();
  readonly #raftTerm: client.Gauge;
  readonly #raftState: client.Gauge;
  readonly #elections: client.Counter;
  readonly #replication: client.Histogram;
  readonly #steps: client.Counter;
  readonly #stepDuration: client.Histogram;
  readonly #queueDepth: client.Gauge;
  readonly #workersOnline: client.Gauge;
  readonly #schedulerLeader: client.Gauge;
  readonly #agentRefusals: client.Counter;
  #lastTerm = 0;

  /** Registers every metric. */
  constructor() {
    const registers = [this.registry];
    this.#raftTerm = new client.Gauge({
      name: "raft_term",
      help: "Raft term of the etcd member this server talks to.",
      registers,
    });
    this.#raftState = new client.Gauge({
      name: "raft_state",
      help: "Raft state of that member: 0 follower, 1 candidate, 2 leader (standalone: 2).",
      registers,
    });
    this.#elections = new client.Counter({
      name: "raft_elections_total",
      help: "Raft term changes seen by this server (each one is an election).",
      registers,
    });
    this.#replication = new client.Histogram({
      name: "raft_replication_latency_ms",
      help: "Latency of a committed store write (a Raft round) as this server measures it.",
      buckets: [0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000],
      registers,
    });
    this.#steps = new client.Counter({
      name: "runnel_steps_total",
      help: "Steps finished, by backend and outcome.",
      labelNames: ["backend", "outcome"],
      registers,
    });
    this.#stepDuration = new client.Histogram({
      name: "runnel_step_duration_seconds",
      help: "Duration of the last attempt of finished steps, by backend and outcome.",
      labelNames: ["backend", "outcome"],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900],
      registers,
    });
    this.#queueDepth = new client.Gauge({
      name: "runnel_queue_depth",
      help: "Steps ready to run that wait for a worker (on the scheduling server).",
      registers,
    });
    this.#workersOnline = new client.Gauge({
      name: "runnel_workers_online",
      help: "Workers registered and heartbeating.",
      registers,
    });
    this.#schedulerLeader = new client.Gauge({
      name: "runnel_scheduler_leader",
      help: "1 on the server that runs the scheduler, 0 elsewhere.",
      registers,
    });
    this.#agentRefusals = new client.Counter({
      name: "runnel_agent_refusals_total",
      help: "Agents refused at Hello (by Reject code) and agent messages dropped because " +
        "they spoke of an attempt that is not the sender's (by message kind).",
      labelNames: ["what"],
      registers,
    });
  }

  /** Counts an agent refused (a Reject code) or an agent message dropped (its kind). */
  onAgentRefused(what: string): void {
    this.#agentRefusals.inc({ what });
  }

  /** Records a Raft status reading. */
  observeRaft(state: RaftState): void {
    if (this.#lastTerm !== 0 && state.term > this.#lastTerm) {
      this.#elections.inc(state.term - this.#lastTerm);
    }
    this.#lastTerm = Math.max(this.#lastTerm, state.term);
    this.#raftTerm.set(state.term);
    this.#raftState.set(
      state.state === "leader" || state.state === "standalone"
        ? 2
        : state.state === "candidate"
        ? 1
        : 0,
    );
  }

  /** Records the latency of one committed write. */
  observeWrite(ms: number): void {
    this.#replication.observe(ms);
  }

  /** Records the number of workers online. */
  setWorkers(count: number): void {
    this.#workersOnline.set(count);
  }

  /** Records whether this server runs the scheduler. */
  setLeader(leading: boolean): void {
    this.#schedulerLeader.set(leading ? 1 : 0);
  }

  /** Folds a scheduler event into the metrics. */
  onSchedulerEvent(event: SchedulerEvent): void {
    if (event.type === "queue") this.#queueDepth.set(event.depth);
    if (event.type === "step-finished") {
      const labels = { backend: event.backend, outcome: event.outcome };
      this.#steps.inc(labels);
      if (event.durationMs !== undefined) {
        this.#stepDuration.observe(labels, event.durationMs / 1000);
      }
    }
  }

  /** The exposition text. */
  async render(): Promise<string> {
    return await this.registry.metrics();
  }

  /** The content type of {@link render}'s text. */
  get contentType(): string {
    return this.registry.contentType;
  }
}
