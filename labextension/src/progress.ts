import { Notification } from '@jupyterlab/apputils';

import { errorMessage } from './api';

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
  work.then(
    result => Notification.update({ id, message: success(result), type: 'success', autoClose: 5000 }),
    (reason: unknown) =>
      Notification.update({
        id,
        message: `${failure}: ${errorMessage(reason)}`,
        type: 'error',
        autoClose: false
      })
  );
  return work;
}
