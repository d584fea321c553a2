import { Notification } from '@jupyterlab/apputils';
import { ReadonlyJSONValue } from '@lumino/coreutils';

import { errorMessage } from './api';

/**
 * JupyterLab draws a notification's toast once react-toastify has loaded (lazily, on the session's
 * first toast): an update that comes before it is drawn is lost on the toast, which then shows the
 * pending message for good. An end that comes that early is told again after this long.
 */
const TOAST_DRAWN_MS = 2000;

/**
 * Show long work as a notification: pending while it runs, then what it gave or why it failed
 * (with what to do, from the server's message). Returns the work itself.
 */
export function withProgress<T>(
  work: Promise<T>,
  pending: string,
  success: (result: T) => string,
  failure: string
): Promise<T> {
  const id = Notification.emit(pending, 'in-progress', { autoClose: false });
  const emitted = Date.now();
  const update = (args: Notification.IUpdate<ReadonlyJSONValue>): void => {
    Notification.update(args);
    const early = TOAST_DRAWN_MS - (Date.now() - emitted);
    if (early > 0) {
      window.setTimeout(() => Notification.update(args), early);
    }
  };
  work.then(
    result => update({ id, message: success(result), type: 'success', autoClose: 5000 }),
    (reason: unknown) =>
      update({
        id,
        message: `${failure}: ${errorMessage(reason)}`,
        type: 'error',
        autoClose: false
      })
  );
  return work;
}
