/**
 * snapkernel's JupyterLab front end: launcher items and the "New GPU kernel…" dialog, the status bar
 * item of the current notebook's kernel, the Snapshots side panel, hibernate/wake notifications.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ILauncher } from '@jupyterlab/launcher';
import { IStatusBar } from '@jupyterlab/statusbar';

import { IStatus, errorMessage, requestAPI } from './api';
import { addLauncherItems } from './launcher';
import { ActiveNotebook } from './notebooks';
import { SnapshotsPanel } from './snapshots';
import { KernelStatusItem } from './statusbar';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'snapkernel:plugin',
  description: 'snapkernel: GPU kernels in sandboxes that hibernate.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ILauncher, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null
  ): void => {
    const settings = app.serviceManager.serverSettings;
    let lastStatus: IStatus | null = null;
    const fetchStatus = async (): Promise<IStatus> => {
      lastStatus = await requestAPI<IStatus>(settings, 'status');
      return lastStatus;
    };
    fetchStatus().catch((reason: unknown) => {
      console.warn(`snapkernel: could not read /snapkernel/api/status: ${errorMessage(reason)}`);
    });
    const notebooks = new ActiveNotebook(shell);

    addLauncherItems(app, launcher, fetchStatus);

    const panel = new SnapshotsPanel(app, notebooks);
    shell.add(panel, 'right', { rank: 600 });

    if (statusBar !== null) {
      const item = new KernelStatusItem(settings, notebooks, () => lastStatus);
      statusBar.registerStatusItem('snapkernel:kernel-status', {
        item,
        align: 'left',
        rank: 5,
        isActive: () => true
      });
    }
  }
};

export default plugin;
