import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * Body of `GET /snapkernel/api/status` (runtimes, GPUs, capacity, sandboxes).
 * Kept open until the front end reads specific fields.
 */
export type SnapkernelStatus = Record<string, unknown>;

/**
 * Fetch `GET /snapkernel/api/status` through jupyter_server (its auth, XSRF and base URL).
 */
export async function fetchStatus(
  settings: ServerConnection.ISettings
): Promise<SnapkernelStatus> {
  const url = URLExt.join(settings.baseUrl, 'snapkernel/api/status');
  // makeRequest throws ServerConnection.NetworkError when the server cannot be reached.
  const response = await ServerConnection.makeRequest(url, {}, settings);
  const text = await response.text();
  let body: unknown = null;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    // jupyter_server and snapkernel errors are JSON {"message", "reason"};
    // anything else (an HTML 404 page) falls back to "Invalid response: 404 Not Found".
    const message =
      body !== null &&
      typeof body === 'object' &&
      'message' in body &&
      typeof body.message === 'string'
        ? body.message
        : undefined;
    throw new ServerConnection.ResponseError(response, message);
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ServerConnection.ResponseError(
      response,
      `snapkernel: expected a JSON object from ${url}, got: ${text.slice(0, 200)}`
    );
  }
  return body as SnapkernelStatus;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'snapkernel:plugin',
  description: 'snapkernel: GPU kernels in sandboxes that hibernate.',
  autoStart: true,
  activate: (app: JupyterFrontEnd): void => {
    const settings = app.serviceManager.serverSettings;
    fetchStatus(settings)
      .then(status => {
        console.log('snapkernel: backend status', status);
      })
      .catch((reason: unknown) => {
        const message = reason instanceof Error ? reason.message : String(reason);
        console.warn(`snapkernel: could not read /snapkernel/api/status: ${message}`);
      });
  }
};

export default plugin;
