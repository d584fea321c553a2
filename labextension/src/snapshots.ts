/**
 * The Snapshots side panel: this notebook's snapshots first (kind, size, age), and buttons to
 * snapshot the current kernel, resume a snapshot into the notebook, and delete one.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { IKernelInfo, ISnapshot, IStarted, errorMessage, postAPI, requestAPI } from './api';
import { formatAge, formatBytes, sortSnapshots } from './format';
import { ActiveNotebook, openNotebookWithKernel } from './notebooks';
import { withProgress } from './progress';

const REFRESH_MS = 10000;

export const snapshotIcon = new LabIcon({
  name: 'snapkernel:snapshot',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M9 3 7.2 5H4a2 2 0 0 0-2 2v12a2 2 0 0 0 2 2h16a2 2 0 0 0 2-2V7a2 2 0 0 0-2-2h-3.2L15 3H9zm3 ' +
    '5a5 5 0 1 1 0 10 5 5 0 0 1 0-10zm0 2a3 3 0 1 0 0 6 3 3 0 0 0 0-6z"/></svg>'
});

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

export class SnapshotsPanel extends Widget {
  constructor(
    private readonly app: JupyterFrontEnd,
    private readonly notebooks: ActiveNotebook
  ) {
    super();
    this.id = 'snapkernel-snapshots';
    this.addClass('snapkernel-Snapshots');
    this.title.icon = snapshotIcon;
    this.title.caption = 'Snapshots';

    const header = element('div', 'snapkernel-Snapshots-header');
    header.append(element('h2', '', 'Snapshots'), this._notebookLabel);
    const controls = element('div', 'snapkernel-Snapshots-controls');
    for (const kind of ['memory', 'state']) {
      const option = element('option', '', kind);
      option.value = kind;
      this._kind.append(option);
    }
    this._kind.title = 'memory: the exact image of the sandbox (gvisor); state: portable variables';
    this._kind.addEventListener('change', () => (this._kindChosen = true));
    this._name.placeholder = 'name (optional)';
    this._create.addEventListener('click', () => void this.create());
    const refresh = element('button', 'jp-mod-styled snapkernel-Snapshots-refresh', '↻');
    refresh.title = 'Refresh';
    refresh.addEventListener('click', () => void this.refresh());
    controls.append(this._kind, this._name, this._create, refresh);
    this.node.append(header, controls, this._message, this._list);

    this.notebooks.changed.connect(() => void this.refresh());
    this._timer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refresh();
      }
    }, REFRESH_MS);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private get settings() {
    return this.app.serviceManager.serverSettings;
  }

  /** Reload the list (and the default kind from the current kernel's runtime). */
  async refresh(): Promise<void> {
    const notebook = this.notebooks.current;
    const path = notebook?.context.path ?? '';
    this._notebookLabel.textContent = notebook ? `for ${path}` : 'no notebook open';
    const kernelId = this.notebooks.kernelId;
    this._create.disabled = kernelId === null;
    try {
      const snapshots = await requestAPI<ISnapshot[]>(this.settings, 'snapshots');
      this._render(sortSnapshots(snapshots, path), path);
      if (kernelId !== null && !this._kindChosen) {
        const info = await requestAPI<IKernelInfo>(this.settings, `kernels/${kernelId}`);
        this._kind.value = info.sandbox?.runtime === 'gvisor' ? 'memory' : 'state';
      }
      this._message.textContent = '';
    } catch (reason) {
      this._message.textContent = `Could not list snapshots: ${errorMessage(reason)}`;
    }
  }

  /** Snapshot the current notebook's kernel. */
  async create(): Promise<void> {
    const kernelId = this.notebooks.kernelId;
    if (kernelId === null) {
      Notification.warning('Open a notebook with a snapkernel kernel to snapshot it.');
      return;
    }
    const kind = this._kind.value;
    const work = withProgress(
      postAPI<ISnapshot>(this.settings, 'snapshots', {
        kernel_id: kernelId,
        kind,
        name: this._name.value.trim()
      }),
      `Taking a ${kind} snapshot of the kernel…`,
      s => `Snapshot ${s.id} saved (${formatBytes(s.size)}).`,
      'Snapshot failed'
    );
    this._create.disabled = true;
    try {
      await work;
      this._name.value = '';
    } catch {
      // told by the notification
    } finally {
      await this.refresh();
    }
  }

  /** Resume a snapshot into the current notebook (its kernel is replaced), or a new notebook. */
  async resume(snapshot: ISnapshot): Promise<void> {
    const notebook = this.notebooks.current;
    const resume = (path: string): Promise<IStarted> =>
      postAPI<IStarted>(this.settings, `snapshots/${snapshot.id}/resume`, { path });
    const resumed = (async (): Promise<IStarted> => {
      if (notebook === null) {
        return openNotebookWithKernel(this.app, '', resume);
      }
      const started = await resume(notebook.context.path);
      // The server moved the notebook's session to the new kernel: connect the notebook to it.
      await notebook.sessionContext.session?.changeKernel({ id: started.kernel.id });
      return started;
    })();
    await withProgress(
      resumed,
      `Resuming ${snapshot.id}…`,
      () => `Resumed ${snapshot.name || snapshot.id}: every variable is back.`,
      'Resume failed'
    ).catch(() => undefined);
    await this.refresh();
  }

  async remove(snapshot: ISnapshot): Promise<void> {
    const answer = await showDialog({
      title: 'Delete snapshot',
      body: `Delete ${snapshot.name || snapshot.id} (${snapshot.kind}, ${formatBytes(snapshot.size)})? This cannot be undone.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await requestAPI<null>(this.settings, `snapshots/${snapshot.id}`, { method: 'DELETE' });
    } catch (reason) {
      Notification.error(`Could not delete ${snapshot.id}: ${errorMessage(reason)}`);
    }
    await this.refresh();
  }

  private _render(snapshots: ISnapshot[], path: string): void {
    const now = Date.now() / 1000;
    this._list.replaceChildren();
    if (snapshots.length === 0) {
      this._list.append(element('li', 'snapkernel-Snapshots-empty', 'No snapshots yet.'));
    }
    for (const snapshot of snapshots) {
      const own = path !== '' && snapshot.path === path;
      const item = element('li', `snapkernel-Snapshot${own ? ' snapkernel-mod-own' : ''}`);
      item.dataset.id = snapshot.id;
      const where = own ? 'this notebook' : snapshot.path || 'no notebook';
      item.append(
        element('div', 'snapkernel-Snapshot-title', snapshot.name || snapshot.id),
        element(
          'div',
          'snapkernel-Snapshot-meta',
          snapshot.damaged
            ? `damaged: ${snapshot.damaged}`
            : `${snapshot.kind} · ${formatBytes(snapshot.size)} · ${formatAge(snapshot.created, now)} · ${where}`
        )
      );
      const buttons = element('div', 'snapkernel-Snapshot-buttons');
      const remove = element('button', 'jp-mod-styled jp-mod-warn snapkernel-Snapshot-delete', 'Delete');
      remove.addEventListener('click', () => void this.remove(snapshot));
      if (!snapshot.damaged) {
        const resume = element('button', 'jp-mod-styled jp-mod-accept snapkernel-Snapshot-resume', 'Resume');
        resume.addEventListener('click', () => void this.resume(snapshot));
        buttons.append(resume);
      }
      buttons.append(remove);
      item.append(buttons);
      this._list.append(item);
    }
  }

  private _notebookLabel = element('div', 'snapkernel-Snapshots-notebook');
  private _kind = element('select', 'jp-mod-styled snapkernel-Snapshots-kind');
  private _name = element('input', 'jp-mod-styled snapkernel-Snapshots-name');
  private _create = element('button', 'jp-mod-styled jp-mod-accept snapkernel-Snapshots-create', 'Snapshot');
  private _message = element('div', 'snapkernel-Snapshots-message');
  private _list = element('ul', 'snapkernel-Snapshots-list');
  private _kindChosen = false;
  private _timer: number;
}
