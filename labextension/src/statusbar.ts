/**
 * The status bar item of the current notebook's snapkernel kernel: runtime, state, GPU utilization
 * and memory, CPU and memory, elapsed time and an estimated cost; notifications when it hibernates,
 * wakes or has moved. A click changes its resources.
 */
import { Notification } from '@jupyterlab/apputils';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { IKernelInfo, IStatus, errorMessage, requestAPI } from './api';
import { currentSpec, resourcesSummary, statusParts, transitionMessage } from './format';
import { ActiveNotebook } from './notebooks';

const POLL_MS = 3000;
const FOLLOW_MS = 500; // a move takes a second or two: its `moving` shows

export class KernelStatusItem extends Widget {
  constructor(
    private readonly settings: ServerConnection.ISettings,
    private readonly notebooks: ActiveNotebook,
    private readonly status: () => IStatus | null,
    onClick: () => void
  ) {
    super();
    this.addClass('snapkernel-StatusItem');
    this.node.addEventListener('click', onClick);
    this.notebooks.changed.connect(() => void this.refresh());
    this._timer = window.setInterval(() => void this.refresh(), POLL_MS);
    void this.refresh();
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  /**
   * Follow a move this tab asked for: redraw often while it runs (the tooltip shows its steps),
   * and once more when it ends. Its own notification tells how it went, not the states.
   */
  follow(kernelId: string, move: Promise<unknown>): void {
    this._following.add(kernelId);
    const timer = window.setInterval(() => void this.refresh(), FOLLOW_MS);
    void this.refresh();
    const done = (): void => {
      window.clearInterval(timer);
      void this.refresh().finally(() => this._following.delete(kernelId));
    };
    move.then(done, done);
  }

  /** Read the current notebook's kernel and redraw; notify on state changes. */
  async refresh(): Promise<void> {
    const seq = ++this._reads;
    const kernelId = this.notebooks.kernelId;
    if (kernelId === null || document.hidden) {
      if (kernelId === null) {
        this._render([], '');
      }
      return;
    }
    let info: IKernelInfo;
    try {
      info = await requestAPI<IKernelInfo>(this.settings, `kernels/${kernelId}`);
    } catch (reason) {
      // A kernel still starting is not listed by the server yet; anything else is an error to show.
      const kernelStatus = this.notebooks.current?.sessionContext.session?.kernel?.status;
      const starting = kernelStatus === 'starting' || kernelStatus === 'unknown';
      this._render(
        ['snapkernel', starting ? 'starting' : 'unavailable'],
        errorMessage(reason),
        starting ? 'starting' : 'failed'
      );
      return;
    }
    if (kernelId !== this.notebooks.kernelId) {
      return; // the notebook changed kernel meanwhile
    }
    if (!info.snapkernel) {
      this._render([], '');
      return;
    }
    if (seq < this._drawn) {
      return; // a later read (a move's quicker ones cross the others) is drawn already
    }
    this._drawn = seq;
    const notice = transitionMessage(this._states.get(kernelId), info.state, {
      message: info.sandbox?.message ?? '',
      resources: resourcesSummary(currentSpec(info))
    });
    this._states.set(kernelId, info.state);
    if (notice !== null && !this._following.has(kernelId)) {
      Notification.emit(notice.message, notice.kind, { autoClose: 8000 });
    }
    const tooltip = [
      info.sandbox ? `sandbox ${info.sandbox.id}` : '',
      info.sandbox?.message ?? '', // while moving: the step it is at
      info.usage?.gpu_detail ?? '',
      info.usage_error,
      'Click to change its resources'
    ]
      .filter(Boolean)
      .join('\n');
    this._render(statusParts(info, this.status()), tooltip, info.state);
  }

  private _render(parts: string[], tooltip: string, state = ''): void {
    this.node.textContent = parts.join(' · ');
    this.node.title = tooltip;
    this.node.dataset.state = state;
    this.setHidden(parts.length === 0);
  }

  private _timer: number;
  private _states = new Map<string, string>();
  private _following = new Set<string>();
  private _reads = 0;
  private _drawn = 0;
}
