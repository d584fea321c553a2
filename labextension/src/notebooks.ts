/**
 * The notebook the user works in (the main area's current notebook), and starting kernels for
 * notebooks through the REST API.
 */
import { ILabShell, JupyterFrontEnd } from '@jupyterlab/application';
import { ISessionContext } from '@jupyterlab/apputils';
import { Contents } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { ILaunchSpec, IStarted, postAPI } from './api';

/** What snapkernel needs of a NotebookPanel (no dependency on @jupyterlab/notebook). */
export interface INotebookLike extends Widget {
  sessionContext: ISessionContext;
  context: { path: string };
}

function asNotebook(widget: Widget | null): INotebookLike | null {
  if (
    widget !== null &&
    widget.hasClass('jp-NotebookPanel') &&
    'sessionContext' in widget &&
    'context' in widget
  ) {
    return widget as INotebookLike;
  }
  return null;
}

/** Follows the current notebook; `changed` fires when it or its kernel changes. */
export class ActiveNotebook {
  constructor(shell: ILabShell) {
    shell.currentChanged.connect((_, args) => this._set(asNotebook(args.newValue)));
    this._set(asNotebook(shell.currentWidget));
  }

  get current(): INotebookLike | null {
    return this._current;
  }

  get changed(): ISignal<this, INotebookLike | null> {
    return this._changed;
  }

  /** The id of the current notebook's kernel, if it has one. */
  get kernelId(): string | null {
    return this._current?.sessionContext.session?.kernel?.id ?? null;
  }

  private _set(notebook: INotebookLike | null): void {
    if (notebook === null || notebook === this._current) {
      return; // a side panel or another document keeps the last notebook current
    }
    this._current = notebook;
    notebook.sessionContext.kernelChanged.connect(this._emit, this);
    notebook.disposed.connect(() => {
      if (this._current === notebook) {
        this._current = null;
        this._changed.emit(null);
      }
    });
    this._changed.emit(notebook);
  }

  private _emit(): void {
    this._changed.emit(this._current);
  }

  private _current: INotebookLike | null = null;
  private _changed = new Signal<this, INotebookLike | null>(this);
}

/**
 * A new untitled notebook in `cwd` whose kernel is started by `start` (given the notebook's path),
 * then opened: its session already exists on the server, so the notebook connects to that kernel.
 */
export async function openNotebookWithKernel(
  app: JupyterFrontEnd,
  cwd: string,
  start: (path: string) => Promise<IStarted>
): Promise<IStarted> {
  const model = (await app.commands.execute('docmanager:new-untitled', {
    path: cwd,
    type: 'notebook'
  })) as Contents.IModel;
  const started = await start(model.path);
  await app.serviceManager.sessions.refreshRunning();
  await app.commands.execute('docmanager:open', { path: model.path, factory: 'Notebook' });
  return started;
}

/** Start a kernel with a launch-time spec for a new notebook in `cwd`. */
export function launchKernel(
  app: JupyterFrontEnd,
  spec: ILaunchSpec,
  cwd: string
): Promise<IStarted> {
  const settings = app.serviceManager.serverSettings;
  return openNotebookWithKernel(app, cwd, path =>
    postAPI<IStarted>(settings, 'kernels', { ...spec, path })
  );
}
