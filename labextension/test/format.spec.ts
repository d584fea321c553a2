import type { IKernelInfo, IStatus } from '../src/api';
import {
  currentSpec,
  describeMove,
  formatAge,
  formatBytes,
  formatCost,
  formatDuration,
  gpuModels,
  gpuModelsOfSpec,
  gpuSpec,
  launcherLabel,
  moveRequest,
  pricePerSecond,
  resourcesSummary,
  sizeSpec,
  sortSnapshots,
  stateLabel,
  statusParts,
  transitionMessage
} from '../src/format';

const GIB = 1024 ** 3;
const PRICES = {
  currency: 'USD',
  gpu_per_second: { H100: 0.001, '*': 0.0005 },
  cpu_per_second: 0.00001,
  memory_gib_per_second: 0.000002
};

describe('formatBytes', () => {
  it.each([
    [0, '0 B'],
    [1023, '1023 B'],
    [1536, '1.5 KiB'],
    [512 * 1024 ** 2, '512 MiB'],
    [80 * GIB, '80 GiB'],
    [1.25 * GIB, '1.3 GiB'],
    [NaN, '0 B']
  ])('%p bytes is %p', (bytes, text) => {
    expect(formatBytes(bytes)).toBe(text);
  });
});

describe('formatDuration and formatAge', () => {
  it.each([
    [0, '0s'],
    [42.9, '42s'],
    [60, '1m 00s'],
    [312, '5m 12s'],
    [7380, '2h 03m'],
    [90000, '1d 1h'],
    [-5, '0s']
  ])('%p seconds is %p', (seconds, text) => {
    expect(formatDuration(seconds)).toBe(text);
  });

  it('says how long ago', () => {
    expect(formatAge(1000, 1065)).toBe('1m 05s ago');
  });
});

describe('formatCost', () => {
  it('uses the currency symbol, 4 decimals below one unit', () => {
    expect(formatCost(0.4213, 'USD')).toBe('$0.4213');
    expect(formatCost(12.5, 'EUR')).toBe('€12.50');
    expect(formatCost(0, 'USD')).toBe('$0.00');
  });

  it('writes an unknown currency code after the amount', () => {
    expect(formatCost(1.5, 'credits')).toBe('1.50 credits');
  });
});

describe('prices', () => {
  it('adds GPUs by model (case-insensitive, * for the rest), cores and memory', () => {
    const perSecond = pricePerSecond(PRICES, {
      gpuModels: ['h100', 'H100', 'A10'],
      cpu: 4,
      memory: 16 * GIB
    });
    expect(perSecond).toBeCloseTo(0.002 + 0.0005 + 0.00004 + 0.000032, 10);
  });

  it('costs nothing without prices', () => {
    const free = { currency: 'USD', gpu_per_second: {}, cpu_per_second: 0, memory_gib_per_second: 0 };
    expect(pricePerSecond(free, { gpuModels: ['H100'], cpu: 8, memory: GIB })).toBe(0);
  });

  it('reads GPU specs', () => {
    expect(gpuModelsOfSpec('H100:2')).toEqual(['H100', 'H100']);
    expect(gpuModelsOfSpec('any:1')).toEqual(['any']);
    expect(gpuModelsOfSpec('')).toEqual([]);
    expect(gpuModelsOfSpec('H100:x')).toEqual([]);
    expect(gpuSpec('H100', 1)).toBe('H100');
    expect(gpuSpec('A100', 4)).toBe('A100:4');
    expect(gpuSpec('', 2)).toBe('');
  });
});

describe('states and notifications', () => {
  it('labels states', () => {
    expect(stateLabel('pending')).toBe('starting');
    expect(stateLabel('kernel_exited')).toBe('kernel exited');
    expect(stateLabel('hibernated')).toBe('hibernated');
    expect(stateLabel('')).toBe('unknown');
    expect(stateLabel('brand_new')).toBe('brand_new');
  });

  it('tells when a kernel hibernates and wakes, not on first sight or a normal start', () => {
    expect(transitionMessage(undefined, 'hibernated')).toBeNull();
    expect(transitionMessage('running', 'running')).toBeNull();
    expect(transitionMessage('starting', 'running')).toBeNull();
    expect(transitionMessage('running', 'hibernating')?.kind).toBe('info');
    expect(transitionMessage('hibernating', 'hibernated')?.message).toMatch(/next cell wakes it/);
    expect(transitionMessage('hibernated', 'waking')?.message).toMatch(/waking/);
    expect(transitionMessage('waking', 'running')?.kind).toBe('success');
    expect(transitionMessage('hibernated', 'running')?.kind).toBe('success');
    expect(transitionMessage('running', 'failed')?.kind).toBe('error');
  });

  it('labels a move, and tells where the kernel went when it ends', () => {
    expect(stateLabel('moving')).toBe('moving');
    expect(transitionMessage('running', 'moving')).toBeNull(); // the status bar shows it
    const moved = {
      message: 'moved to gvisor, cpu 2, memory 2Gi by memory in 1.2s',
      resources: 'cpu 2 · 2Gi · gvisor'
    };
    expect(transitionMessage('moving', 'running', moved)).toEqual({
      kind: 'success',
      message: 'Kernel moved: now cpu 2 · 2Gi · gvisor, every variable is where you left it.'
    });
    const back = { message: 'could not move, so it runs where it was: no H100 free', resources: 'cpu 1' };
    expect(transitionMessage('moving', 'running', back)).toEqual({
      kind: 'error',
      message: 'Kernel could not move, so it runs where it was: no H100 free'
    });
    expect(transitionMessage('moving', 'running')?.message).toBe(
      'Kernel moved: every variable is where you left it.'
    );
    expect(transitionMessage('moving', 'failed')?.kind).toBe('error');
  });
});

describe('sortSnapshots', () => {
  const snaps = [
    { id: 'snap-a', path: 'other.ipynb', created: 300 },
    { id: 'snap-b', path: 'nb.ipynb', created: 100 },
    { id: 'snap-c', path: '', created: 400 },
    { id: 'snap-d', path: 'nb.ipynb', created: 200 }
  ];

  it("puts this notebook's snapshots first, newest first", () => {
    expect(sortSnapshots(snaps, 'nb.ipynb').map(s => s.id)).toEqual([
      'snap-d',
      'snap-b',
      'snap-c',
      'snap-a'
    ]);
  });

  it('orders by age alone without a notebook, and leaves its input alone', () => {
    expect(sortSnapshots(snaps, '').map(s => s.id)).toEqual(['snap-c', 'snap-a', 'snap-d', 'snap-b']);
    expect(snaps[0].id).toBe('snap-a');
  });
});

describe('launcher labels', () => {
  const gpus = [
    { model: 'H100', memory_total: 80 * GIB },
    { model: 'H100', memory_total: 80 * GIB },
    { model: 'L4', memory_total: 24 * GIB }
  ];

  it('counts GPU models', () => {
    expect(gpuModels(gpus).get('H100')).toEqual({ count: 2, memory: 80 * GIB });
  });

  it('labels kernels with the GPU model and memory', () => {
    expect(launcherLabel({ gpu: 'H100' }, gpus)).toBe('H100 GPU · 80 GiB');
    expect(launcherLabel({ gpu: 'H100:2' }, gpus)).toBe('2× H100 GPU · 80 GiB');
    expect(launcherLabel({ gpu: 'A100' }, gpus)).toBe('A100 GPU');
    expect(launcherLabel({}, gpus)).toBe('CPU sandbox');
  });
});

describe('statusParts', () => {
  const status = { prices: PRICES } as unknown as IStatus;
  const info: IKernelInfo = {
    kernel: { id: 'k', name: 'snapkernel-python', execution_state: 'idle' },
    snapkernel: true,
    state: 'running',
    now: 1000 + 312,
    sandbox: {
      id: 'sb-0123456789ab',
      runtime: 'gvisor',
      state: 'running',
      message: '',
      created: 1000,
      spec: { gpu: 'H100', cpu: 2, memory: '8Gi' }
    },
    usage: {
      cpu_percent: 12.4,
      cpu_limit: 2,
      memory_used: 1.5 * GIB,
      memory_limit: 8 * GIB,
      gpus: [
        {
          index: 0,
          model: 'H100',
          utilization: 45,
          memory_used: 40 * GIB,
          memory_total: 80 * GIB,
          sandbox_memory_used: 3 * GIB,
          sandbox_memory_known: true
        }
      ],
      gpu_detail: ''
    },
    usage_error: ''
  };

  it('shows runtime, state, GPU, CPU and memory with their limits, elapsed time and cost', () => {
    // 312 s of one H100, 2 cores and 8 GiB: 312 * (0.001 + 0.00002 + 0.000016)
    expect(statusParts(info, status)).toEqual([
      'gvisor',
      'running',
      'H100 45% 3 GiB/80 GiB',
      'CPU 12% of 2',
      'mem 1.5 GiB/8 GiB',
      '5m 12s',
      '≈$0.3232'
    ]);
  });

  it('shows the whole GPU memory where the sandbox share is unknown, and no cost without prices', () => {
    const gpus = [{ ...info.usage!.gpus[0], sandbox_memory_known: false }];
    const parts = statusParts({ ...info, usage: { ...info.usage!, gpus } }, null);
    expect(parts[2]).toBe('H100 45% 40 GiB/80 GiB');
    expect(parts.some(p => p.startsWith('≈'))).toBe(false);
  });

  it('leaves out limits it does not know', () => {
    const usage = { ...info.usage!, gpus: [], cpu_limit: 0, memory_limit: 0 };
    expect(statusParts({ ...info, usage }, null).slice(2, 4)).toEqual(['CPU 12%', 'mem 1.5 GiB']);
  });

  it('shows a hibernated kernel without usage', () => {
    expect(statusParts({ ...info, state: 'hibernated', usage: null }, null)).toEqual([
      'gvisor',
      'hibernated',
      '5m 12s'
    ]);
  });

  it('shows a kernel being moved, without the figures of a sandbox in between', () => {
    expect(statusParts({ ...info, state: 'moving' }, null)).toEqual([
      'gvisor',
      'moving',
      '5m 12s'
    ]);
  });
});

describe('moves', () => {
  it('writes sizes as specs', () => {
    expect(sizeSpec(4 * GIB)).toBe('4Gi');
    expect(sizeSpec(640 * 1024 ** 2)).toBe('640Mi');
    expect(sizeSpec(2 * 1024 ** 4)).toBe('2Ti');
    expect(sizeSpec(1000)).toBe('1000');
    expect(sizeSpec(0)).toBe('');
  });

  const sandbox = {
    id: 'sb-1',
    runtime: 'gvisor',
    state: 'running',
    message: '',
    created: 0,
    spec: { gpu: 'H100:2', cpu: 8, memory: '64Gi', disk: '', runtime: '' }
  };
  const usage = {
    cpu_percent: 0,
    cpu_limit: 1,
    memory_used: 0,
    memory_limit: 4 * GIB,
    gpus: [],
    gpu_detail: ''
  };
  const info = (spec: object, withUsage = true): IKernelInfo => ({
    kernel: { id: 'k', name: 'snapkernel-python', execution_state: 'idle' },
    snapkernel: true,
    state: 'running',
    now: 0,
    sandbox: { ...sandbox, spec: { ...sandbox.spec, ...spec } },
    usage: withUsage ? usage : null,
    usage_error: ''
  });

  it("reads the kernel's spec, with the limits in effect for the defaults", () => {
    expect(currentSpec(info({ disk: '20Gi' }))).toEqual({
      gpu: 'H100:2',
      cpu: 8,
      memory: '64Gi',
      disk: '20Gi',
      runtime: 'gvisor'
    });
    expect(currentSpec(info({ gpu: '', cpu: undefined, memory: '' }))).toEqual({
      gpu: '',
      cpu: 1,
      memory: '4Gi',
      runtime: 'gvisor'
    });
    // Hibernated: no usage, so the defaults stay unknown.
    expect(currentSpec(info({ gpu: '', cpu: undefined, memory: '' }, false))).toEqual({
      gpu: '',
      runtime: 'gvisor'
    });
    expect(currentSpec({ ...info({}), sandbox: null })).toEqual({});
  });

  it('sends only what changed; an emptied field keeps its value; gpu "" is no GPU', () => {
    const current = { gpu: 'H100', cpu: 1, memory: '4Gi', runtime: 'gvisor' };
    expect(moveRequest(current, { gpu: 'H100', cpu: 2, memory: '1Gi', runtime: 'gvisor' })).toEqual({
      cpu: 2,
      memory: '1Gi'
    });
    expect(moveRequest(current, { ...current })).toEqual({});
    expect(moveRequest(current, { gpu: 'H100', disk: '20Gi' })).toEqual({ disk: '20Gi' });
    expect(moveRequest(current, { cpu: 1 }, true)).toEqual({ gpu: '', allow_cpu_fallback: true });
    expect(moveRequest(current, { cpu: 1 })).toEqual({ gpu: '' });
    expect(moveRequest({ gpu: '' }, { gpu: 'H100:2' }, true)).toEqual({ gpu: 'H100:2' });
    expect(moveRequest(current, { ...current, runtime: 'process' })).toEqual({ runtime: 'process' });
  });

  it('describes a move and the resources it gave', () => {
    expect(describeMove({ cpu: 2, memory: '2Gi' })).toBe('cpu 2, memory 2Gi');
    expect(describeMove({ gpu: '', allow_cpu_fallback: true })).toBe('no GPU');
    expect(describeMove({ gpu: 'H100:2', disk: '20Gi', runtime: 'gvisor' })).toBe(
      'GPU H100:2, disk 20Gi, runtime gvisor'
    );
    expect(describeMove({})).toBe('');
    expect(resourcesSummary({ gpu: 'H100:2', cpu: 8, memory: '64Gi', runtime: 'gvisor' })).toBe(
      '2× H100 · cpu 8 · 64Gi · gvisor'
    );
    expect(resourcesSummary({ gpu: '', cpu: 2, memory: '2Gi', runtime: 'process' })).toBe(
      'cpu 2 · 2Gi · process'
    );
  });
});
