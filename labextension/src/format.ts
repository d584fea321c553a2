/**
 * Pure logic of the snapkernel front end (no JupyterLab imports): formatting of sizes, durations and
 * costs, sandbox state labels and notifications, snapshot ordering, the body of a move. Unit-tested
 * with jest.
 */
import type { IKernelInfo, ILaunchSpec, IMoveRequest, IStatus } from './api';

/** Prices from `GET /snapkernel/api/status` (SnapKernelApp traitlets). */
export interface IPrices {
  currency: string;
  gpu_per_second: Record<string, number>;
  cpu_per_second: number;
  memory_gib_per_second: number;
}

/** What a sandbox holds, for its price: GPU models (one entry per GPU), cores, memory bytes. */
export interface IResources {
  gpuModels: string[];
  cpu: number;
  memory: number;
}

const GIB = 1024 ** 3;

/** 1536 → "1.5 KiB"; 0 → "0 B". */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 1024) {
    return `${Math.max(0, Math.round(bytes || 0))} B`;
  }
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 'B';
  for (const next of units) {
    if (value < 1024) {
      break;
    }
    value /= 1024;
    unit = next;
  }
  const text = value >= 100 ? value.toFixed(0) : value.toFixed(1).replace(/\.0$/, '');
  return `${text} ${unit}`;
}

/** Seconds → "42s", "5m 07s", "2h 03m", "3d 4h". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds || 0));
  const pad = (n: number): string => String(n).padStart(2, '0');
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  }
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

/** How long ago a unix time was, from `now` (unix seconds): "3m 05s ago". */
export function formatAge(created: number, now: number): string {
  return `${formatDuration(now - created)} ago`;
}

/** 0.4213 EUR → "€0.42"; tiny amounts keep 4 decimals; an unknown currency code is written after. */
export function formatCost(amount: number, currency: string): string {
  const digits = amount > 0 && amount < 1 ? 4 : 2;
  try {
    return new Intl.NumberFormat('en-US', {
      style: 'currency',
      currency,
      minimumFractionDigits: digits,
      maximumFractionDigits: digits
    }).format(amount);
  } catch {
    return `${amount.toFixed(digits)} ${currency}`;
  }
}

/** Price of one second of these resources; a GPU model without a price uses '*', else costs nothing. */
export function pricePerSecond(prices: IPrices, resources: IResources): number {
  let total = resources.cpu * prices.cpu_per_second;
  total += (resources.memory / GIB) * prices.memory_gib_per_second;
  for (const model of resources.gpuModels) {
    const table = prices.gpu_per_second;
    const exact = Object.keys(table).find(
      key => key.toLowerCase() === model.toLowerCase()
    );
    total += exact !== undefined ? table[exact] : (table['*'] ?? 0);
  }
  return total;
}

/** "H100:2" → ["H100", "H100"]; "" → []; "any:1" → ["any"]. */
export function gpuModelsOfSpec(gpu: string): string[] {
  const match = /^([A-Za-z][A-Za-z0-9_-]*)(?::(\d+))?$/.exec(gpu.trim());
  if (!match) {
    return [];
  }
  return Array<string>(Number(match[2] ?? '1')).fill(match[1]);
}

/** The GPU spec for a model and count: ("H100", 2) → "H100:2"; ("", n) → "" (no GPU). */
export function gpuSpec(model: string, count: number): string {
  if (!model || count < 1) {
    return '';
  }
  return count === 1 ? model : `${model}:${count}`;
}

const STATE_LABELS: Record<string, string> = {
  pending: 'starting',
  starting: 'starting',
  running: 'running',
  kernel_exited: 'kernel exited',
  stopping: 'stopping',
  exited: 'exited',
  lost: 'lost',
  failed: 'failed',
  deleted: 'deleted',
  hibernating: 'hibernating',
  hibernated: 'hibernated',
  waking: 'waking',
  moving: 'moving'
};

/** The backend's sandbox state (lowercase proto name) as the status bar shows it. */
export function stateLabel(state: string): string {
  return STATE_LABELS[state] ?? (state || 'unknown');
}

const ASLEEP = new Set(['hibernating', 'hibernated']);

/**
 * The notification for a sandbox going from `previous` to `next` state, or null when there is
 * nothing to tell (first sight, no change, ordinary start). At the end of a move, `moved` says how
 * it went: the sandbox's message ("could not move, so it runs where it was: …" when it did not)
 * and its resources now (resourcesSummary).
 */
export function transitionMessage(
  previous: string | undefined,
  next: string,
  moved: { message: string; resources: string } = { message: '', resources: '' }
): { kind: 'info' | 'success' | 'error'; message: string } | null {
  if (previous === undefined || previous === next) {
    return null;
  }
  if (next === 'running' && previous === 'moving') {
    if (moved.message.startsWith('could not move')) {
      return { kind: 'error', message: `Kernel ${moved.message}` };
    }
    const now = moved.resources ? ` now ${moved.resources},` : '';
    return { kind: 'success', message: `Kernel moved:${now} every variable is where you left it.` };
  }
  if (next === 'hibernating') {
    return {
      kind: 'info',
      message: 'Kernel hibernating: it was idle, its memory is being saved.'
    };
  }
  if (next === 'hibernated') {
    return {
      kind: 'info',
      message:
        'Kernel hibernated: its memory is saved and its resources released; the next cell wakes it.'
    };
  }
  if (next === 'waking') {
    return { kind: 'info', message: 'Kernel waking up from hibernation…' };
  }
  if (next === 'running' && (previous === 'waking' || ASLEEP.has(previous))) {
    return { kind: 'success', message: 'Kernel awake: every variable is where you left it.' };
  }
  if (next === 'failed' || next === 'lost') {
    return {
      kind: 'error',
      message: `Kernel sandbox ${next}: restart the kernel, or resume it from a snapshot.`
    };
  }
  return null;
}

/** 4 GiB → "4Gi", 640 MiB → "640Mi": bytes as a memory or disk spec; 0 → "" (the default). */
export function sizeSpec(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes <= 0) {
    return '';
  }
  for (const [unit, size] of [
    ['Ti', 1024 ** 4],
    ['Gi', GIB],
    ['Mi', 1024 ** 2],
    ['Ki', 1024]
  ] as const) {
    if (bytes % size === 0) {
      return `${bytes / size}${unit}`;
    }
  }
  return String(Math.round(bytes));
}

/**
 * What a kernel has now, as a launch spec: its sandbox's spec, with the CPU and memory limits in
 * effect where it asked for the backend's defaults (known from its usage while it is awake).
 */
export function currentSpec(info: IKernelInfo): ILaunchSpec {
  const sandbox = info.sandbox;
  if (sandbox === null) {
    return {};
  }
  const spec: ILaunchSpec = { gpu: sandbox.spec.gpu, runtime: sandbox.runtime };
  const cpu = sandbox.spec.cpu ?? info.usage?.cpu_limit;
  if (cpu) {
    spec.cpu = cpu;
  }
  const memory = sandbox.spec.memory || sizeSpec(info.usage?.memory_limit ?? 0);
  if (memory) {
    spec.memory = memory;
  }
  if (sandbox.spec.disk) {
    spec.disk = sandbox.spec.disk;
  }
  return spec;
}

/**
 * The body of a move from `current` to the spec `chosen` in the dialog: only what differs. An
 * emptied field keeps what the kernel has (a move has no "back to the default"); gpu "" is no GPU.
 */
export function moveRequest(
  current: ILaunchSpec,
  chosen: ILaunchSpec,
  allowCpuFallback = false
): IMoveRequest {
  const request: IMoveRequest = {};
  if ((chosen.gpu ?? '') !== (current.gpu ?? '')) {
    request.gpu = chosen.gpu ?? '';
  }
  if (chosen.cpu !== undefined && chosen.cpu !== current.cpu) {
    request.cpu = chosen.cpu;
  }
  for (const key of ['memory', 'disk', 'runtime'] as const) {
    const value = chosen[key];
    if (value && value !== current[key]) {
      request[key] = value;
    }
  }
  if (request.gpu === '' && allowCpuFallback) {
    request.allow_cpu_fallback = true;
  }
  return request;
}

/** What a move changes, for its notifications: "cpu 2, memory 2Gi", "no GPU, cpu 4". */
export function describeMove(request: IMoveRequest): string {
  const parts: string[] = [];
  if (request.gpu !== undefined) {
    parts.push(request.gpu ? `GPU ${request.gpu}` : 'no GPU');
  }
  if (request.cpu !== undefined) {
    parts.push(`cpu ${request.cpu}`);
  }
  for (const key of ['memory', 'disk', 'runtime'] as const) {
    if (request[key]) {
      parts.push(`${key} ${request[key]}`);
    }
  }
  return parts.join(', ');
}

/** A kernel's resources in short: "2× H100 · cpu 8 · 64Gi · gvisor", "cpu 2 · 2Gi · process". */
export function resourcesSummary(spec: ILaunchSpec): string {
  const models = gpuModelsOfSpec(spec.gpu ?? '');
  const parts: string[] = [];
  if (models.length > 0) {
    parts.push(models.length > 1 ? `${models.length}× ${models[0]}` : models[0]);
  }
  if (spec.cpu !== undefined) {
    parts.push(`cpu ${spec.cpu}`);
  }
  for (const value of [spec.memory, spec.runtime]) {
    if (value) {
      parts.push(value);
    }
  }
  return parts.join(' · ');
}

/** The fields of a snapshot that ordering needs. */
export interface ISnapshotOrder {
  id: string;
  path: string;
  created: number;
}

/** This notebook's snapshots first, then the others; newest first within each group. */
export function sortSnapshots<T extends ISnapshotOrder>(snapshots: T[], notebookPath: string): T[] {
  const own = (s: T): number => (notebookPath !== '' && s.path === notebookPath ? 0 : 1);
  return [...snapshots].sort(
    (a, b) => own(a) - own(b) || b.created - a.created || a.id.localeCompare(b.id)
  );
}

/** A GPU of `GET /snapkernel/api/status`. */
export interface IGpu {
  model: string;
  memory_total: number;
}

/** GPU models of the host, each with how many there are and the memory of one. */
export function gpuModels(gpus: IGpu[]): Map<string, { count: number; memory: number }> {
  const models = new Map<string, { count: number; memory: number }>();
  for (const gpu of gpus) {
    const seen = models.get(gpu.model);
    models.set(gpu.model, {
      count: (seen?.count ?? 0) + 1,
      memory: Math.max(seen?.memory ?? 0, gpu.memory_total)
    });
  }
  return models;
}

/** The launcher label of a snapkernel kernelspec: "H100 GPU · 80 GiB" or "CPU sandbox". */
export function launcherLabel(config: { gpu?: unknown }, gpus: IGpu[]): string {
  const gpu = typeof config.gpu === 'string' ? config.gpu : '';
  const models = gpuModelsOfSpec(gpu);
  if (models.length === 0) {
    return 'CPU sandbox';
  }
  const info = gpuModels(gpus).get(models[0]);
  const count = models.length > 1 ? `${models.length}× ` : '';
  const memory = info ? ` · ${formatBytes(info.memory)}` : '';
  return `${count}${models[0]} GPU${memory}`;
}

/** The text parts of the status bar item for one kernel (exported for the unit tests). */
export function statusParts(info: IKernelInfo, status: IStatus | null): string[] {
  const sandbox = info.sandbox;
  const parts = [sandbox?.runtime ?? 'snapkernel', stateLabel(info.state)];
  // Mid-move the figures are of neither sandbox (its processes are saved, or not started yet).
  const usage = info.state === 'moving' ? null : info.usage;
  if (usage !== null) {
    for (const gpu of usage.gpus) {
      const own = gpu.sandbox_memory_known ? gpu.sandbox_memory_used : gpu.memory_used;
      parts.push(
        `${gpu.model} ${gpu.utilization}% ${formatBytes(own)}/${formatBytes(gpu.memory_total)}`
      );
    }
    // With the limits: a move changes them, and a kernel near its memory limit is about to be killed.
    const cores = usage.cpu_limit > 0 ? ` of ${usage.cpu_limit}` : '';
    const memory = usage.memory_limit > 0 ? `/${formatBytes(usage.memory_limit)}` : '';
    parts.push(
      `CPU ${Math.round(usage.cpu_percent)}%${cores}`,
      `mem ${formatBytes(usage.memory_used)}${memory}`
    );
  }
  if (sandbox !== null) {
    const elapsed = Math.max(0, info.now - sandbox.created);
    parts.push(formatDuration(elapsed));
    if (status !== null) {
      const perSecond = pricePerSecond(status.prices, {
        gpuModels: usage?.gpus.length
          ? usage.gpus.map(g => g.model)
          : gpuModelsOfSpec(sandbox.spec.gpu),
        cpu: usage?.cpu_limit ?? sandbox.spec.cpu ?? 0,
        memory: usage?.memory_limit ?? 0
      });
      if (perSecond > 0) {
        parts.push(`≈${formatCost(perSecond * elapsed, status.prices.currency)}`);
      }
    }
  }
  return parts;
}
