/**
 * Launcher items for the installed snapkernel kernels (labelled with GPU model and memory) and the
 * "New GPU kernel…" dialog (GPU model and count from the backend's status, CPU, memory, disk,
 * runtime), whose form "Change resources…" reuses.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { LabIcon, kernelIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { ILaunchSpec, IStarted, IStatus, errorMessage } from './api';
import { formatBytes, gpuModels, gpuModelsOfSpec, gpuSpec, launcherLabel } from './format';
import { launchKernel } from './notebooks';
import { withProgress } from './progress';

export const LAUNCH = 'snapkernel:launch';
export const NEW_KERNEL_DIALOG = 'snapkernel:new-kernel-dialog';
const CATEGORY = 'snapkernel';

export const gpuIcon = new LabIcon({
  name: 'snapkernel:gpu',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M7 2h2v2h2V2h2v2h2V2h2v2a3 3 0 0 1 3 3v2h2v2h-2v2h2v2h-2v2a3 3 0 0 1-3 3v2h-2v-2h-2v2h-2v-2H9v2H7v-2a3 ' +
    '3 0 0 1-3-3v-2H2v-2h2v-2H2V9h2V7a3 3 0 0 1 3-3V2zm1 5a1 1 0 0 0-1 1v8a1 1 0 0 0 1 1h8a1 1 0 0 0 1-1V8a1 ' +
    '1 0 0 0-1-1H8z"/></svg>'
});

/** Start a kernel for a new notebook, with progress and errors as notifications. */
function launchWithProgress(app: JupyterFrontEnd, spec: ILaunchSpec, cwd: string): Promise<IStarted> {
  const what = spec.gpu ? `a ${spec.gpu} GPU kernel` : 'a snapkernel kernel';
  return withProgress(
    launchKernel(app, spec, cwd),
    `Starting ${what} in a sandbox…`,
    () => `Started ${what}.`,
    `Could not start ${what}`
  );
}

/**
 * The form of the "New GPU kernel…" dialog, and of "Change resources…" with the kernel's `current`
 * spec filled in: there a "Move GPU tensors to host memory" box shows when a GPU kernel is to get
 * none.
 */
export class KernelSpecForm extends Widget implements Dialog.IBodyWidget<ILaunchSpec> {
  constructor(status: IStatus, current: ILaunchSpec | null = null) {
    super();
    this.addClass('snapkernel-NewKernel');
    const models = gpuModels(status.gpus);
    const [currentModel = '', ...more] = gpuModelsOfSpec(current?.gpu ?? '');
    const currentCount = currentModel ? more.length + 1 : 0;
    this._gpu.append(new Option('none (CPU only)', ''));
    for (const [model, info] of models) {
      this._gpu.append(new Option(`${model} · ${formatBytes(info.memory)} (${info.count} here)`, model));
    }
    if (currentModel && !models.has(currentModel)) {
      this._gpu.append(new Option(`${currentModel} (current)`, currentModel)); // "any", or not here now
    }
    const update = (): void => {
      const max =
        models.get(this._gpu.value)?.count ?? (this._gpu.value === currentModel ? currentCount : 0);
      this._count.max = String(Math.max(1, max));
      this._count.disabled = max === 0;
      this._fallbackRow.hidden = !(currentModel && this._gpu.value === '');
    };
    this._gpu.addEventListener('change', update);
    this._gpu.value = currentModel;
    this._count.type = 'number';
    this._count.min = '1';
    this._count.value = String(Math.max(1, currentCount));
    this._cpu.type = 'number';
    this._cpu.min = '0.5';
    this._cpu.step = '0.5';
    this._cpu.placeholder = 'backend default';
    this._cpu.value = current?.cpu !== undefined ? String(current.cpu) : '';
    this._memory.placeholder = 'e.g. 8Gi (backend default if empty)';
    this._memory.value = current?.memory ?? '';
    this._disk.placeholder = 'e.g. 20Gi (backend default if empty)';
    this._disk.value = current?.disk ?? '';
    this._runtime.append(new Option(`default (${status.default_runtime})`, ''));
    for (const runtime of status.runtimes) {
      const option = new Option(
        runtime.available ? runtime.name : `${runtime.name} (unavailable)`,
        runtime.name
      );
      option.disabled = !runtime.available;
      this._runtime.append(option);
    }
    this._runtime.value = current?.runtime ?? '';
    if (models.size === 0) {
      const note = document.createElement('p');
      note.className = 'snapkernel-NewKernel-note';
      note.textContent = `No GPU on this backend: ${status.gpu_detail || 'none reported'}. The kernel gets CPUs only.`;
      this.node.append(note);
    }
    for (const [label, input] of [
      ['GPU model', this._gpu],
      ['GPU count', this._count],
      ['CPU cores', this._cpu],
      ['Memory', this._memory],
      ['Disk', this._disk],
      ['Runtime', this._runtime]
    ] as const) {
      const row = document.createElement('label');
      row.className = 'snapkernel-NewKernel-row';
      const text = document.createElement('span');
      text.textContent = label;
      input.classList.add('jp-mod-styled');
      input.name = label.toLowerCase().replace(' ', '-');
      row.append(text, input);
      this.node.append(row);
    }
    this._fallback.type = 'checkbox';
    this._fallback.name = 'allow-cpu-fallback';
    this._fallbackRow.className = 'snapkernel-NewKernel-fallback';
    this._fallbackRow.append(this._fallback, ' Move GPU tensors to host memory');
    this._fallbackRow.title = 'Without it, moving a kernel that holds GPU tensors to no GPU is refused';
    this.node.append(this._fallbackRow);
    update();
  }

  getValue(): ILaunchSpec {
    const spec: ILaunchSpec = {};
    const gpu = gpuSpec(this._gpu.value, Number(this._count.value) || 1);
    if (gpu) {
      spec.gpu = gpu;
    }
    if (this._cpu.value) {
      spec.cpu = Number(this._cpu.value);
    }
    for (const [key, input] of [
      ['memory', this._memory],
      ['disk', this._disk]
    ] as const) {
      if (input.value.trim()) {
        spec[key] = input.value.trim();
      }
    }
    if (this._runtime.value) {
      spec.runtime = this._runtime.value;
    }
    return spec;
  }

  /** Whether the user allows GPU tensors to go to host memory (the box shows, and is ticked). */
  get allowCpuFallback(): boolean {
    return !this._fallbackRow.hidden && this._fallback.checked;
  }

  private _gpu = document.createElement('select');
  private _count = document.createElement('input');
  private _cpu = document.createElement('input');
  private _memory = document.createElement('input');
  private _disk = document.createElement('input');
  private _runtime = document.createElement('select');
  private _fallback = document.createElement('input');
  private _fallbackRow = document.createElement('label');
}

/** The commands; the launcher items once the backend's status is known. */
export function addLauncherItems(
  app: JupyterFrontEnd,
  launcher: ILauncher | null,
  status: () => Promise<IStatus>
): void {
  app.commands.addCommand(LAUNCH, {
    label: args => String(args.label ?? 'snapkernel kernel'),
    caption: args => `Start ${String(args.name)} in a sandbox, in a new notebook`,
    icon: args => (args.gpu || String(args.label ?? '').includes('GPU') ? gpuIcon : kernelIcon),
    execute: args => {
      const spec: ILaunchSpec = { name: String(args.name ?? 'snapkernel-python') };
      for (const key of ['gpu', 'memory', 'disk', 'runtime'] as const) {
        if (typeof args[key] === 'string' && args[key]) {
          spec[key] = args[key] as string;
        }
      }
      if (typeof args.cpu === 'number') {
        spec.cpu = args.cpu;
      }
      return launchWithProgress(app, spec, String(args.cwd ?? ''));
    }
  });
  app.commands.addCommand(NEW_KERNEL_DIALOG, {
    label: 'New GPU kernel…',
    caption: 'Start a kernel with the GPUs, CPUs, memory and runtime you choose',
    icon: gpuIcon,
    execute: async args => {
      let current: IStatus;
      try {
        current = await status();
      } catch (reason) {
        Notification.error(`snapkernel backend unavailable: ${errorMessage(reason)}`);
        return;
      }
      const result = await showDialog({
        title: 'New GPU kernel',
        body: new KernelSpecForm(current),
        buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Start' })]
      });
      if (result.button.accept && result.value !== null) {
        await launchWithProgress(app, result.value, String(args.cwd ?? '')).catch(() => undefined);
      }
    }
  });
  if (launcher === null) {
    return;
  }
  launcher.add({ command: NEW_KERNEL_DIALOG, category: CATEGORY, rank: 100 });
  status()
    .then(current => {
      current.kernelspecs.forEach((spec, rank) => {
        launcher.add({
          command: LAUNCH,
          args: { name: spec.id, label: launcherLabel(spec.config, current.gpus) },
          category: CATEGORY,
          rank
        });
      });
    })
    .catch((reason: unknown) => {
      console.warn(`snapkernel: no launcher items, the backend status failed: ${errorMessage(reason)}`);
    });
}

