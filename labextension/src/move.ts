/**
 * "Change resources…": move the current notebook's kernel to a sandbox with other GPUs, CPUs,
 * memory, disk or runtime, keeping its Jupyter kernel id and every variable. The dialog is the
 * "New GPU kernel…" form filled in with what the kernel has now.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';

import { IKernelInfo, IMoved, IStatus, errorMessage, postAPI, requestAPI } from './api';
import { currentSpec, describeMove, moveRequest } from './format';
import { KernelSpecForm, gpuIcon } from './launcher';
import { ActiveNotebook } from './notebooks';
import { withProgress } from './progress';

export const CHANGE_RESOURCES = 'snapkernel:change-resources';

/**
 * The command; it is enabled when the current notebook's kernel is a snapkernel one (its kernelspec
 * among the backend's), and gives each move it starts to `started` (the status bar follows it).
 */
export function addMoveCommand(
  app: JupyterFrontEnd,
  notebooks: ActiveNotebook,
  status: () => Promise<IStatus>,
  lastStatus: () => IStatus | null,
  started: (kernelId: string, move: Promise<IMoved>) => void
): void {
  const settings = app.serviceManager.serverSettings;
  app.commands.addCommand(CHANGE_RESOURCES, {
    label: 'Change resources…',
    caption:
      'Move the kernel to a sandbox with other GPUs, CPUs, memory or runtime, keeping its variables',
    icon: gpuIcon,
    isEnabled: () => {
      const name = notebooks.current?.sessionContext.session?.kernel?.name;
      return name !== undefined && (lastStatus()?.kernelspecs.some(k => k.id === name) ?? false);
    },
    execute: async () => {
      const kernelId = notebooks.kernelId;
      if (kernelId === null) {
        return;
      }
      let info: IKernelInfo;
      let backend: IStatus;
      try {
        [info, backend] = await Promise.all([
          requestAPI<IKernelInfo>(settings, `kernels/${kernelId}`),
          status()
        ]);
      } catch (reason) {
        Notification.error(`Could not read the kernel's resources: ${errorMessage(reason)}`);
        return;
      }
      const current = currentSpec(info);
      const form = new KernelSpecForm(backend, current);
      const result = await showDialog({
        title: 'Change resources',
        body: form,
        buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Move' })]
      });
      if (!result.button.accept || result.value === null) {
        return;
      }
      const request = moveRequest(current, result.value, form.allowCpuFallback);
      const what = describeMove(request);
      if (what === '') {
        Notification.info('The kernel already has these resources: nothing to move.', {
          autoClose: 5000
        });
        return;
      }
      const move = withProgress(
        postAPI<IMoved>(settings, `kernels/${kernelId}/move`, request),
        `Moving the kernel to ${what}…`,
        () => `Moved the kernel to ${what}: every variable is where you left it.`,
        'Could not move the kernel'
      );
      started(kernelId, move);
      await move.catch(() => undefined);
    }
  });
  // The menu and the palette ask isEnabled when shown; tell them when the kernel changes too.
  notebooks.changed.connect(() => app.commands.notifyCommandChanged(CHANGE_RESOURCES));
}
