/**
 * The REST API of the server extension (`/snapkernel/api/...`), called through jupyter_server's
 * ServerConnection (its auth, XSRF token and base URL).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IGpu, IPrices } from './format';

export interface IKernelspecInfo {
  id: string;
  display_name: string;
  config: { gpu?: unknown; [key: string]: unknown };
}

/** `GET /snapkernel/api/status`. */
export interface IStatus {
  version: string;
  default_runtime: string;
  runtimes: { name: string; available: boolean; version: string; detail: string }[];
  gpus: (IGpu & { index: number; name: string; memory_used: number; utilization: number })[];
  capacity: { cpu_total: number; memory_total: number; gpus_total: number };
  gpu_detail: string;
  kernelspecs: IKernelspecInfo[];
  prices: IPrices;
}

export interface IGpuUsage {
  index: number;
  model: string;
  utilization: number;
  memory_used: number;
  memory_total: number;
  sandbox_memory_used: number;
  sandbox_memory_known: boolean;
}

export interface IUsage {
  cpu_percent: number;
  cpu_limit: number;
  memory_used: number;
  memory_limit: number;
  gpus: IGpuUsage[];
  gpu_detail: string;
}

/** `GET /snapkernel/api/kernels/{id}`. */
export interface IKernelInfo {
  kernel: { id: string; name: string; execution_state: string };
  snapkernel: boolean;
  /** The sandbox's state, lowercase ("running", "hibernated", "moving"…), or "starting" before it has one. */
  state: string;
  now: number;
  sandbox: {
    id: string;
    runtime: string;
    state: string;
    /** Why it failed, was lost or exited; while moving, the step it is at. */
    message: string;
    created: number;
    /** As asked at launch (or by the last move): cpu absent, memory, disk or runtime "" for the default. */
    spec: { gpu: string; cpu?: number; memory: string; disk?: string; runtime?: string };
  } | null;
  usage: IUsage | null;
  usage_error: string;
}

/** A snapshot of `GET /snapkernel/api/snapshots`. */
export interface ISnapshot {
  id: string;
  kind: string;
  name: string;
  size: number;
  created: number;
  path: string;
  runtime: string;
  gpu_model: string;
  /** Set when the snapshot's catalog row cannot be read: what is wrong (only `id` is set besides). */
  damaged?: string;
}

/** `POST /snapkernel/api/kernels` and `.../snapshots/{id}/resume`. */
export interface IStarted {
  kernel: { id: string; name: string };
  session: { id: string; path: string } | null;
}

/** The launch-time spec of `POST /snapkernel/api/kernels`. */
export interface ILaunchSpec {
  name?: string;
  gpu?: string;
  cpu?: number;
  memory?: string;
  disk?: string;
  runtime?: string;
  restore_from?: string;
  path?: string;
}

/** `POST /snapkernel/api/kernels/{id}/move`: only what changes; gpu "" is "no GPU". */
export interface IMoveRequest {
  gpu?: string;
  cpu?: number;
  memory?: string;
  disk?: string;
  runtime?: string;
  /** A GPU kernel moving to no GPU: its GPU tensors go to host memory (refused without it). */
  allow_cpu_fallback?: boolean;
}

/** What the move POST returns once the kernel runs in its new sandbox. */
export interface IMoved {
  kernel: { id: string; name: string };
  sandbox: NonNullable<IKernelInfo['sandbox']>;
}

/**
 * Call a snapkernel route; the JSON body on success, a ServerConnection.ResponseError with the
 * server's `message` otherwise (snapkernel and jupyter_server errors are JSON {"message", "reason"}).
 */
export async function requestAPI<T>(
  settings: ServerConnection.ISettings,
  path: string,
  init: RequestInit = {}
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'snapkernel/api', path);
  // makeRequest throws ServerConnection.NetworkError when the server cannot be reached.
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  let body: unknown = null;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    // Anything that is not JSON (an HTML 404 page) falls back to "Invalid response: 404 Not Found".
    const message =
      body !== null &&
      typeof body === 'object' &&
      'message' in body &&
      typeof body.message === 'string'
        ? body.message
        : undefined;
    throw new ServerConnection.ResponseError(response, message);
  }
  if (text.length > 0 && body === null) {
    throw new ServerConnection.ResponseError(
      response,
      `snapkernel: expected JSON from ${url}, got: ${text.slice(0, 200)}`
    );
  }
  return body as T;
}

/** POST a JSON body. */
export function postAPI<T>(
  settings: ServerConnection.ISettings,
  path: string,
  body: object
): Promise<T> {
  return requestAPI<T>(settings, path, { method: 'POST', body: JSON.stringify(body) });
}

/** The message of an error, for notifications. */
export function errorMessage(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}
