/**
 * snapkernel's JupyterLab front end: launcher items and the "New GPU kernel…" dialog, the status bar
 * item of the current notebook's kernel, the Snapshots side panel, hibernate/wake notifications,
 * "Change resources…" (Kernel menu, palette, a click on the status bar item).
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { IStatusBar } from '@jupyterlab/statusbar';

import { IStatus, errorMessage, requestAPI } from './api';
import { NEW_KERNEL_DIALOG, addLauncherItems } from './launcher';
import { CHANGE_RESOURCES, addMoveCommand } from './move';
import { ActiveNotebook } from './notebooks';
import { SnapshotsPanel, snapshotIcon } from './snapshots';
import { KernelStatusItem } from './statusbar';

const SNAPSHOT = 'snapkernel:snapshot';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'snapkernel:plugin',
  description: 'snapkernel: GPU kernels in sandboxes that hibernate.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ILauncher, IStatusBar, ICommandPalette, IMainMenu],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null
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
    app.commands.addCommand(SNAPSHOT, {
      label: 'Snapshot the current kernel',
      caption: 'Take a snapshot of the current notebook\'s snapkernel kernel',
      icon: snapshotIcon,
      isEnabled: () => notebooks.kernelId !== null,
      execute: async () => {
        shell.activateById(panel.id);
        await panel.create();
      }
    });
    let item: KernelStatusItem | null = null;
    addMoveCommand(app, notebooks, fetchStatus, () => lastStatus, (kernelId, move) =>
      item?.follow(kernelId, move)
    );
    if (palette !== null) {
      for (const command of [NEW_KERNEL_DIALOG, SNAPSHOT, CHANGE_RESOURCES]) {
        palette.addItem({ command, category: 'snapkernel' });
      }
    }
    mainMenu?.kernelMenu.addGroup([{ command: CHANGE_RESOURCES }], 100);

    if (statusBar !== null) {
      item = new KernelStatusItem(settings, notebooks, () => lastStatus, () => {
        if (app.commands.isEnabled(CHANGE_RESOURCES)) {
          void app.commands.execute(CHANGE_RESOURCES);
        }
      });
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
